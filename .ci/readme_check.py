"""`make readme-check`: the README's walk-through, run from a fresh clone of this repository.

    python .ci/readme_check.py [--reuse-venv .venv] [--skip make-test,make-generate]

Clones the committed HEAD into a temporary directory and runs there, as a new user would, every
command of the walk-through ("The two commands", the client lines under it, "Quickstart: Python",
`make lint`). Each command below must appear verbatim in the README, so the two cannot drift apart.
The only liberty taken: `make serve` gets free ports (`PORT=`, `HTTP_PORT=`) and the clients the
matching `--target`, so that the check runs beside other servers on a shared machine.

`--reuse-venv DIR`: instead of `make install` (~10 minutes), the clone's `.venv` sees DIR's installed
packages (a .pth line) and gets the clone itself installed editable, so the clone's code is what runs.
Not part of `make test`: with `make test` and `make generate` it takes ~20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, the command as the README writes it, what its output must contain)
WALK = [
    ("make-serve", "make serve", None),
    ("client", '.venv/bin/jtrail client "What is the capital of France?"', "Paris"),
    ("client-info", ".venv/bin/jtrail client --info", "policy"),
    ("chat", '.venv/bin/jtrail chat --system "You are a concise assistant."', "Paris"),
    ("make-generate", "make generate", "### Q:"),
    ("python-quickstart", "import jtrail", "Paris"),
    ("make-lint", "make lint", None),
    ("make-test", "make test", " passed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_quickstart(readme: str) -> str:
    m = re.search(r"## Quickstart: Python\s+```python\n(.*?)```", readme, re.S)
    if m is None:
        raise SystemExit("readme-check: the README has no '## Quickstart: Python' code block")
    return m.group(1)


def run(cmd: str, cwd: Path, timeout: float, expect: str | None, stdin: str = "") -> None:
    t0 = time.monotonic()
    print(f"readme-check: $ {cmd}" + (f" <<< {stdin!r}" if stdin else ""), flush=True)
    r = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout, input=stdin)
    out = r.stdout + r.stderr
    if r.returncode != 0 or (expect is not None and expect not in out):
        print(out[-4000:], file=sys.stderr)
        raise SystemExit(f"readme-check: FAILED: {cmd!r} (exit {r.returncode}"
                         f"{'' if expect is None else f', expected {expect!r} in its output'})")
    print(f"readme-check:   ok in {time.monotonic() - t0:.0f} s", flush=True)


def make_venv(clone: Path, reuse: Path | None) -> None:
    if reuse is None:
        run("make install", clone, 1800, None)
        return
    site = next((reuse / "lib").glob("python3*/site-packages"))
    subprocess.run([sys.executable, "-m", "venv", str(clone / ".venv")], check=True)
    mine = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    # the reused venv may itself point at another (a worktree's venv does): follow its path lines
    extra = [site] + [Path(ln.strip()) for p in site.glob("zz_*.pth") for ln in p.read_text().splitlines()
                      if ln.strip() and not ln.startswith(("import", "#"))]
    (mine / "zz_reused_venv.pth").write_text("".join(f"{p}\n" for p in extra))
    run(".venv/bin/python -m pip install -q --no-deps -e .", clone, 600, None)
    (clone / ".venv" / ".jtrail-installed").touch()  # the Makefile's stamp: `make` installs nothing more


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reuse-venv", type=Path, default=None, help="a venv with the dependencies installed")
    p.add_argument("--skip", default="", help=f"comma-separated steps to skip: {[w[0] for w in WALK]}")
    p.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = p.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - {w[0] for w in WALK}:
        raise SystemExit(f"readme-check: --skip: unknown steps {sorted(unknown)}")
    readme = (ROOT / "README.md").read_text()
    for name, cmd, _ in WALK:
        if cmd not in readme:
            raise SystemExit(f"readme-check: the README no longer says {cmd!r} (step {name}): update both")
    tmp = Path(tempfile.mkdtemp(prefix="jtrail-readme-check-"))
    clone = tmp / "jtrail"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    print(f"readme-check: fresh clone of {head} in {clone}", flush=True)
    make_venv(clone, args.reuse_venv.resolve() if args.reuse_venv else None)
    port, http_port = free_port(), free_port()
    target = f"--target 127.0.0.1:{port}"
    print(f"readme-check: $ make serve PORT={port} HTTP_PORT={http_port}", flush=True)
    log = tmp / "serve.log"  # a file, not a pipe: nobody reads the server's log while the steps run
    with log.open("w") as f:
        server = subprocess.Popen(["make", "serve", f"PORT={port}", f"HTTP_PORT={http_port}"], cwd=clone,
                                  stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        while "jtrail: serving on" not in log.read_text():  # the model loads and compiles first
            if server.poll() is not None or time.monotonic() - t0 > 900:
                print(log.read_text()[-4000:], file=sys.stderr)
                raise SystemExit("readme-check: FAILED: make serve did not get to serving")
            time.sleep(1.0)
        print(f"readme-check:   serving after {time.monotonic() - t0:.0f} s", flush=True)
        for name, cmd, expect in WALK[1:]:
            if name in skip:
                print(f"readme-check: SKIPPED (--skip): {cmd}", flush=True)
                continue
            if name == "python-quickstart":
                (clone / "quickstart.py").write_text(python_quickstart(readme))
                run(".venv/bin/python quickstart.py", clone, 900, expect)
            else:  # the chat gets one question on stdin, then end of input
                cmd = cmd.replace("jtrail client", f"jtrail client {target}").replace(
                    "jtrail chat", f"jtrail chat {target}")
                run(cmd, clone, 1800, expect, "What is the capital of France?\n" if name == "chat" else "")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # as Ctrl-C would: the server drains and exits
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print("readme-check: every walk-through command ran" + (f" except {sorted(skip)}" if skip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
