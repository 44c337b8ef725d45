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

from jtrail.bench import guidellm
from jtrail.bench.processes import jtrail_cmd


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
