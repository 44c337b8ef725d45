"""How the front-door benchmarks launch their subprocesses on a box where jtrail and its wheels are
installed with `pip install --target DIR` (PYTHONPATH=DIR) and the benchmark runs from the checkout."""

from __future__ import annotations

import subprocess
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
