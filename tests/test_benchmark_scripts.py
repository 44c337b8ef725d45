"""Every script in benchmarks/ imports and parses its arguments: `--help` through each script's own
`__main__` path, all in one subprocess (one interpreter start, so the suite stays fast). Every script
also runs end to end on CPU (kernels.py: its --smoke): test_benchmark_runs.py (routing.py:
test_routing_bench.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))

RUNNER = r"""
import runpy, sys, io, contextlib
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None) or "usage" not in out.getvalue():
            failed.append(f"{path}: exit {e.code!r}, output {out.getvalue()[:200]!r}")
    except Exception as e:
        failed.append(f"{path}: {type(e).__name__}: {e}")
print("\n".join(failed) if failed else "ALL OK")
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports_and_parses_its_arguments() -> None:
    assert len(SCRIPTS) >= 10, SCRIPTS
    r = subprocess.run([sys.executable, "-c", RUNNER, *map(str, SCRIPTS)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_serving_replay_names_an_unknown_policy_before_loading_the_model() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--workload", "replay",
                        "--replay", "missing.npz", "--model", "missing.gguf", "--policies", "fcfs,trial"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0 and "--policies: unknown trial" in r.stderr, r.stderr[-2000:]


def test_serving_replay_names_a_trail_label_outside_the_policies_before_loading_the_model() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--workload", "replay",
                        "--replay", "missing.npz", "--model", "missing.gguf", "--policies", "fcfs,trail-host",
                        "--trail-label", "trail-host-preempt"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0 and "--trail-label 'trail-host-preempt' is not among --policies" in r.stderr, \
        r.stderr[-2000:]


def test_greedy_parity_compares_each_variant_with_the_first():
    """Identical requests and first divergence positions, counted by hand: a token differs at 2, one
    output is a prefix of the other (diverges at its end), one is equal."""
    from jtrail.bench.greedy_parity import compare

    got = compare({"a": [[1, 2, 3], [4, 5], [6]], "b": [[1, 2, 9], [4, 5, 7], [6]],
                   "c": [[1, 2, 3], [4, 5], [6]]})
    assert got["b"] == {"identical_requests": 1, "requests": 3, "first_divergence_positions": [2, 2]}
    assert got["c"]["identical_requests"] == 3 and got["c"]["first_divergence_positions"] == []
