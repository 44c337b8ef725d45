"""Issue 18, the first hour: every start-up mistake exits non-zero within seconds, as one line on stderr
naming the input, with no traceback; a port another server holds is refused, never shared."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from _procs import stop_gracefully

FAST_S = 5.0  # the bound for a start-up mistake to be reported


def _run(*args: str, module: str = "jtrail.serve") -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    r.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return r


def assert_one_line_error(r: subprocess.CompletedProcess, *names: str) -> str:
    """Non-zero exit, within FAST_S, stderr exactly one line that names every one of `names`."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    for n in names:
        assert n in lines[0], (n, lines[0])
    assert r.elapsed < FAST_S, f"took {r.elapsed:.1f}s: {lines[0]}"  # type: ignore[attr-defined]
    return lines[0]


@pytest.fixture()
def listener() -> Iterator[int]:
    """A port some other process listens on (a plain socket, as any other server would hold it)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def running_server() -> Iterator[tuple[int, int]]:
    """A real `jtrail serve --mock` holding (gRPC port, HTTP port)."""
    cmd = [sys.executable, "-m", "jtrail.serve", "--mock", "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    m = re.search(r"serving on [\d.]+:(\d+) .* http=[\d.]+:(\d+)", proc.stdout.readline())
    assert m, "server did not start"
    yield int(m.group(1)), int(m.group(2))
    stop_gracefully(proc, timeout=15)


def test_second_server_on_the_grpc_port_of_a_running_one_is_refused(running_server) -> None:
    grpc_port, _ = running_server
    r = _run("--mock", "--port", str(grpc_port), "--http-port", "0")
    assert_one_line_error(r, f"--port {grpc_port}", "in use")


def test_second_server_on_the_http_port_of_a_running_one_is_refused(running_server) -> None:
    _, http_port = running_server
    r = _run("--mock", "--port", "0", "--http-port", str(http_port))
    assert_one_line_error(r, f"--http-port {http_port}", "in use")


def test_busy_metrics_port_is_one_line_naming_it(listener: int) -> None:
    r = _run("--mock", "--port", "0", "--http-port", "0", "--metrics-port", str(listener))
    assert_one_line_error(r, f"--metrics-port {listener}")


@pytest.mark.parametrize("args, names", [
    (["--metrics-port", "70000"], ["--metrics-port 70000"]),
    (["--port", "-1"], ["--port -1"]),
    (["--host", "no-such-host.invalid"], ["--host", "no-such-host.invalid"]),
    (["--host", "10.255.255.77"], ["--host", "10.255.255.77"]),
    (["--probe", "/no/such/probe"], ["--probe", "/no/such/probe"]),
    (["--probe", "no-such-name"], ["--probe", "no-such-name"]),
    (["--tensor-parallel", "4096"], ["--tensor-parallel 4096"]),
    (["--policy", "no-such-policy"], ["no-such-policy"]),
])
def test_bad_start_up_input_is_one_fast_line_naming_it(args: list[str], names: list[str]) -> None:
    # not --mock: each must be caught before any model would load
    r = _run("--port", "0", "--http-port", "0", *args)
    assert_one_line_error(r, *names)


def test_busy_port_through_the_jtrail_cli(listener: int) -> None:
    r = _run("serve", "--port", str(listener), "--http-port", "0", module="jtrail.cli")
    assert_one_line_error(r, f"--port {listener}")


def test_grpc_server_does_not_share_a_port_with_another_grpc_server() -> None:
    """The server's own bind (behind the pre-flight check, for the race): with gRPC's default
    SO_REUSEPORT, the second JtrailServer would bind the first one's port without error."""
    from jtrail.serving.engine.fake_runner import mock_engine
    from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig

    async def main() -> None:
        first = JtrailServer(mock_engine(), ServerConfig(port=0))
        await first.start()
        try:
            second = JtrailServer(mock_engine(), ServerConfig(port=first.port))
            with pytest.raises(OSError, match=f"--port {first.port}"):
                await second.start()
        finally:
            await first.stop(grace_s=0.0)

    asyncio.run(main())


def test_busy_metrics_port_in_the_server_is_an_oserror_naming_it(listener: int) -> None:
    from jtrail.serving.frontdoor.metrics import ServerMetrics

    with pytest.raises(OSError, match=f"--metrics-port {listener}"):
        ServerMetrics().start_http(listener)


def test_every_asset_directory_is_declared_as_package_data() -> None:
    """Each importable-named directory under jtrail/assets is a package in pyproject (setuptools warns
    "Package would be ignored" otherwise, and a future version drops its files); the packaging of the
    whole tree was checked once by building the wheel: the same 115 files as before."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    want = {".".join(("jtrail", *d.relative_to(root / "jtrail").parts))
            for d in [root / "jtrail" / "assets", *(root / "jtrail" / "assets").rglob("*")]
            if d.is_dir() and all(p.isidentifier() for p in d.relative_to(root / "jtrail").parts)}
    assert want <= set(cfg["packages"])
    assert want <= set(cfg["package-data"])


def test_version_and_help_defaults() -> None:
    r = _run("--version", module="jtrail.cli")
    assert r.returncode == 0 and r.stdout.strip().startswith("jtrail 0.")
    r = _run("train-probe", "--help", module="jtrail.cli")
    assert "--epochs EPOCHS       (default: 4)" in r.stdout and "(default: 0.001)" in r.stdout
    r = _run("--help")  # python -m jtrail.serve
    assert "(default: 50051)" in r.stdout and "(default: 8000)" in r.stdout


def test_finish_reasons_print_as_vllm_spells_them() -> None:
    from jtrail.serving.sequence import FinishReason

    assert [str(FinishReason.STOP), f"{FinishReason.LENGTH}"] == ["stop", "length"]
