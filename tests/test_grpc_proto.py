"""The committed gRPC stubs match what grpcio-tools generates from the proto today."""

import ast
import re
from pathlib import Path

from jtrail.serving.frontdoor.proto import jtrail_v1_pb2 as pb
from jtrail.serving.frontdoor.proto import regen

_REGEN = "run python -m jtrail.serving.frontdoor.proto.regen"


def _descriptor_bytes(pb2_source: str) -> bytes:
    m = re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source, re.DOTALL)
    assert m, "no serialized descriptor in the generated module"
    return ast.literal_eval(m.group(1))


def _tool_version(grpc_source: str) -> str:
    return re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_source).group(1)


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    fresh = {p.name: p.read_text() for p in regen.generate_stubs(tmp_path)}
    committed = {}
    for name in fresh:
        path = regen.PROTO_DIR / name
        assert path.is_file(), f"{name} missing; {_REGEN}"
        committed[name] = path.read_text()
    # The schema itself (every message, field, service) must match whatever grpcio-tools is installed.
    assert _descriptor_bytes(committed["jtrail_v1_pb2.py"]) == _descriptor_bytes(fresh["jtrail_v1_pb2.py"]), \
        f"jtrail_v1_pb2.py is stale; {_REGEN}"
    # With the very grpcio-tools that made them, the files must be byte-identical (other versions
    # only differ in their version-check boilerplate).
    if _tool_version(committed["jtrail_v1_pb2_grpc.py"]) == _tool_version(fresh["jtrail_v1_pb2_grpc.py"]):
        for name, text in fresh.items():
            assert committed[name] == text, f"{name} is stale; {_REGEN}"


def test_proto_is_versioned_and_has_the_service() -> None:
    assert pb.DESCRIPTOR.package == "jtrail.v1"
    assert pb.DESCRIPTOR.serialized_pb == _descriptor_bytes(
        (regen.PROTO_DIR / "jtrail_v1_pb2.py").read_text())
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Jtrail"].methods}
    assert methods == {"Generate", "ServerInfo", "Stats"}
    gen = pb.DESCRIPTOR.services_by_name["Jtrail"].methods_by_name["Generate"]
    assert gen.server_streaming and not gen.client_streaming
    # unset sampling fields must be distinguishable from zero (top_p=0 is an error, not "default")
    assert pb.SamplingParams.DESCRIPTOR.fields_by_name["top_p"].has_presence
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["max_tokens"].has_presence
