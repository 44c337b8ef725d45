"""How the front-door benchmarks launch their subprocesses on a box where jtrail and its wheels are
installed with `pip install --target DIR` (PYTHONPATH=DIR) and the benchmark runs from the checkout."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jtrail.bench import guidellm, processes
from jtrail.bench.processes import Proc, jtrail_cmd


def test_jtrail_cmd_ignores_a_jtrail_folder_in_the_working_directory(tmp_path: Path) -> None:
    # The checkout's ./jtrail lacks the subpackages pyproject maps in (jtrail.serving, ...): `python -m`
    # from the repository root imported it instead of the installed package (the H200 run failed so).
    decoy = tmp_path / "jtrail"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the working directory was on sys.path')\n")
    r = subprocess.run(jtrail_cmd("--version"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()


def test_guidellm_exe_falls_back_to_the_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert guidellm.guidellm_exe("/opt/x/guidellm") == ["/opt/x/guidellm"]
    monkeypatch.setattr(guidellm.shutil, "which", lambda name: None)
    monkeypatch.setattr(guidellm.sys, "executable", str(tmp_path / "python3"))
    assert guidellm.guidellm_exe(None) == [str(tmp_path / "python3"), "-m", "guidellm"]
    (tmp_path / "guidellm").write_text("#!/bin/sh\n")
    assert guidellm.guidellm_exe(None) == [str(tmp_path / "guidellm")]
    monkeypatch.setattr(guidellm.shutil, "which", lambda name: "/usr/bin/guidellm")
    assert guidellm.guidellm_exe(None) == ["/usr/bin/guidellm"]


def test_sigterm_stops_the_benchmarks_servers(tmp_path: Path) -> None:
    # `timeout` sends SIGTERM; the replicas run in their own sessions, so only the benchmark's own
    # cleanup can stop them (a GPU box would otherwise keep them, and their memory, for the next run)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i} why?"}) + "\n" for i in range(8)))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "benchmarks" / "routing.py"), "--mock", "--prompts",
                             str(prompts), "--pool", "8", "--max-output", "4000", "--max-context", "4096",
                             "--pages", "512", "--out", str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        targets: list[str] = []
        for line in proc.stdout:  # type: ignore[union-attr]
            if "replicas SERVING at" in line:
                targets = json.loads(line.split("SERVING at ")[1].replace("'", '"'))
                break
        assert len(targets) == 2
        time.sleep(1.0)  # inside the warm-up / profile
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 20
    for t in targets:
        host, port = t.rsplit(":", 1)
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                break  # nothing listens: the replica is gone
            assert time.monotonic() < deadline, f"replica {t} still serving after the benchmark's SIGTERM"
            time.sleep(0.5)


# A server that ignores SIGTERM (a stuck drain): only SIGKILL stops it.
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('serving on 127.0.0.1:1', flush=True); time.sleep(120)")


def test_servers_left_running_are_stopped_at_exit_even_if_stubborn(tmp_path: Path) -> None:
    # a Proc that no `finally` stops (a SIGTERM landed while it was being built, or an earlier stop
    # failed) is still in the registry that the atexit hook stops; a stubborn one gets SIGKILL
    procs = [Proc(f"s{i}", [sys.executable, "-c", STUBBORN], {}, r"serving on (\S+)", tmp_path, 60)
             for i in range(2)]
    assert all(p.proc in processes._LIVE and p.proc.poll() is None for p in procs)
    t0 = time.monotonic()
    processes.stop_processes([p.proc for p in procs], timeout_s=1.0)
    assert all(p.proc.poll() is not None for p in procs)
    assert time.monotonic() - t0 < 8  # one shared drain time, not one per server
    assert not any(p.proc in processes._LIVE for p in procs)


LEAKER = """
import sys
from pathlib import Path
from jtrail.bench.processes import Proc
server = "import time; print('serving on 127.0.0.1:1', flush=True); time.sleep(120)"
p = Proc("s", [sys.executable, "-c", server], {}, r"serving on (\\S+)",
         Path(sys.argv[1]), 60)
print(p.proc.pid, flush=True)
sys.exit(3)  # no stop(): as a benchmark that a signal interrupted between spawning and its `try`
"""


def test_a_benchmark_that_exits_without_stopping_its_server_still_stops_it(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", LEAKER, str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break  # gone (reaped by the parent's atexit hook)
        if state == "Z":
            break  # exited, not yet reaped by init
        assert time.monotonic() < deadline, f"server {pid} still running after its benchmark exited"
        time.sleep(0.2)
