"""Runs benchmarks/ scripts end to end through their own `__main__` (runpy), several in one interpreter
so the suite pays for one start and one JAX import per group (tests/test_benchmark_runs.py)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# In the child: `prelude` (code that makes inputs), then each [script, *argv] in order; a script's
# output is framed by "@@ <name>" markers and its wall seconds; the first failure ends the run.
RUNNER = r"""
import json, runpy, sys, time, traceback
spec = json.loads(sys.argv[1])
exec(spec["prelude"])
for script, *argv in spec["runs"]:
    name = script.rsplit("/", 1)[-1]
    print(f"@@ start {name}", flush=True)
    sys.argv = [script, *argv]
    t0 = time.perf_counter()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            print(f"@@ FAILED {name}: exit {e.code!r}", flush=True)
            sys.exit(1)
    except BaseException:
        traceback.print_exc()
        print(f"@@ FAILED {name}", flush=True)
        sys.exit(1)
    print(f"@@ done {name} {time.perf_counter() - t0:.1f}s", flush=True)
"""


def run_scripts(runs: list[list[str]], cwd: Path, env: dict[str, str], prelude: str = "",
                timeout: float = 600) -> dict[str, str]:
    """Run `runs` ([script name, *argv]) in one child process; -> each script's stdout by name (a
    script's second run: "name#index"). Fails the test with the child's output tail when a script fails."""
    spec = {"prelude": prelude, "runs": [[str(BENCH / script), *argv] for script, *argv in runs]}
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd, env={**os.environ, **env})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    outs = {}
    for m in re.finditer(r"@@ start (\S+)\n(.*?)@@ done \1 ([\d.]+)s", r.stdout, re.S):
        name = m.group(1) if m.group(1) not in outs else f"{m.group(1)}#{len(outs)}"  # a script run twice
        outs[name] = m.group(2)
        print(f"{name}: {m.group(3)} s")  # shown with -s: what each script costs
    assert len(outs) == len(runs), r.stdout[-4000:]
    return outs


def assert_finite(doc: dict[str, Any], keys: list[str] | tuple[str, ...]) -> None:
    """Each key holds a finite number (not None, not NaN, not a bool)."""
    for k in keys:
        v = doc.get(k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        assert ok, f"{k}: {v!r} is not a finite number in {sorted(doc)}"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
