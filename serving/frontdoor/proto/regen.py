"""Regenerate the committed gRPC stubs from `jtrail_v1.proto` with grpcio-tools.

Run `python -m jtrail.serving.frontdoor.proto.regen` after editing the proto. The stubs are committed (so
installs need no grpcio-tools); tests/test_grpc_proto.py regenerates into a temp dir and checks
that the committed files are identical.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "jtrail_v1.proto"
STUB_NAMES = ("jtrail_v1_pb2.py", "jtrail_v1_pb2_grpc.py", "jtrail_v1_pb2.pyi")


def generate_stubs(out_dir: Path) -> list[Path]:
    """Run protoc into `out_dir` and make the imports package-relative; returns the stub paths."""
    import importlib.resources

    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO_DIR / PROTO_NAME)]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    grpc_stub = out_dir / "jtrail_v1_pb2_grpc.py"
    # protoc emits `import jtrail_v1_pb2`, which only works with the folder on sys.path.
    text = re.sub(r"^import jtrail_v1_pb2 as", "from . import jtrail_v1_pb2 as", grpc_stub.read_text(),
                  flags=re.MULTILINE)
    grpc_stub.write_text(text)
    return [out_dir / n for n in STUB_NAMES]


def main() -> int:
    paths = generate_stubs(PROTO_DIR)
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
