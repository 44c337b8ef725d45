"""benchmarks/routing.py end to end on CPU: two `jtrail serve --mock` replicas, one router per policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_routing_benchmark_runs_every_policy_on_the_same_trace(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}: " + "why? " * (1 + i % 4)}) + "\n"
                               for i in range(10)))
    out = tmp_path / "routing.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--mock", "--prompts", str(prompts),
           "--pool", "8", "--requests", "8", "--max-output", "6", "--slots", "2", "--pages", "64",
           "--routers", "round-robin,least-requests,power-of-two,token-aware", "--repeats", "2",
           "--deadline-s", "90",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OUT": str(tmp_path / "out")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert (tmp_path / "out" / "routing.json").exists()  # the $OUT copy
    assert set(doc["table"]) == {"round-robin", "least-requests", "power-of-two", "token-aware"}
    assert doc["all_completed"] and doc["workload"]["requests"] == 8
    for row in doc["table"].values():  # two repeats of the 8-request trace each
        assert row["completed"] == 16 and [sum(x) for x in row["per_replica_finished"]] == [8, 8]
        assert 0 < row["mean_ttft"] <= row["mean_e2e"]
        assert len(row["mean_e2e_per_repeat"]) == 2
        assert abs(np.mean(row["mean_e2e_per_repeat"]) - row["mean_e2e"]) < 1e-9
    assert doc["table"]["round-robin"]["per_replica_finished"] == [[4, 4], [4, 4]]
    assert doc["ratios"]["rr_over_token_aware_mean_e2e"] > 0
    assert len(doc["ratios"]["rr_over_token_aware_mean_e2e_per_repeat"]) == 2
    assert doc["bars"]["least_requests_over_token_aware_mean_e2e_real"] > 0
    assert doc["bars"]["every_request_finished"]
    for k in ("command", "device", "date", "git_commit", "capacity_req_s"):
        assert k in doc
    assert "| token-aware |" in r.stdout


def test_routing_benchmark_rejects_bad_counts_before_starting_anything() -> None:
    for bad in (["--repeats", "0"], ["--replicas", "0"]):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--mock", *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "must be >= 1" in r.stderr
        assert "starting" not in r.stdout  # no replica was started


def test_routing_benchmark_sharegpt_lengths_mode(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"q{i} " + "why? " * (1 + i % 3)}) for i in range(8)]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "routing.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--mock", "--prompts", str(prompts),
           "--pool", "6", "--requests", "6", "--max-output", "12", "--slots", "2", "--pages", "64",
           "--routers", "least-requests,token-aware", "--lengths", "sharegpt", "--deadline-s", "60",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["workload"]["mode"].startswith("forced lengths (ShareGPT")
    assert 1 <= doc["workload"]["output_len_mean"] <= 12 and doc["all_completed"]


def test_routing_benchmark_replay_mode_forces_the_recorded_answers(tmp_path: Path) -> None:
    from jtrail.replay import ReplaySet

    rng = np.random.default_rng(0)
    n = 10  # token ids below 256: inside the fake runner's vocabulary
    prompts = [rng.integers(1, 200, 3 + i % 5).astype(np.int32) for i in range(n)]
    answers = [rng.integers(1, 200, 2 + (7 * i) % 11).astype(np.int32) for i in range(n)]
    ReplaySet(prompts, answers, [f"c{i}" for i in range(n)], ["bench"] * n).save(tmp_path / "replay.npz")
    out = tmp_path / "routing.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--mock",
           "--replay", str(tmp_path / "replay.npz"),
           "--pool", "8", "--requests", "8", "--max-output", "16", "--slots", "2", "--pages", "64",
           "--policy", "trail", "--routers", "least-requests,token-aware", "--deadline-s", "60",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["workload"]["mode"].startswith("replay") and doc["all_completed"]
    assert doc["workload"]["usable"] == 8
    lens = sorted(len(a) for a in answers)
    assert lens[0] <= doc["workload"]["output_len_mean"] <= lens[-1]
    assert doc["bars"]["least_requests_over_token_aware_mean_e2e_real"] > 0


def _row(e2e: list[float], done: list[int], n: int = 10) -> dict:
    return {"mean_e2e_per_repeat": e2e, "mean_ttft_per_repeat": [0.1] * len(e2e),
            "p99_e2e_per_repeat": e2e,
            "completed_per_repeat": done, "all_completed_per_repeat": [d == n for d in done],
            "mean_e2e": float(np.mean(e2e)), "completed": sum(done), "requests": n * len(done)}


def test_an_unfinished_repeat_gives_no_ratio_and_no_bar() -> None:
    from jtrail.bench.routing_report import ratio_table, real_bars

    table = {"least-requests": _row([2.0, 9.0, 3.0], [10, 10, 10]),
             "token-aware": _row([1.0, 1.0, 2.0], [10, 7, 10])}
    ratios = ratio_table(table)
    assert ratios["least_requests_repeats_used"] == 2  # the second repeat: token-aware left 3 unfinished
    assert abs(ratios["least_requests_over_token_aware_mean_e2e"] - 2.5 / 1.5) < 1e-12
    assert ratios["least_requests_over_token_aware_mean_e2e_per_repeat"][1] is None
    bars = real_bars(table, ratios, complete=False)
    assert bars["least_requests_over_token_aware_mean_e2e_real"] is None
    assert not bars["every_request_finished"]
    table["token-aware"] = _row([1.0, 1.0, 2.0], [7, 7, 7])
    assert ratio_table(table)["least_requests_over_token_aware_mean_e2e"] is None


def test_a_real_run_keeps_the_files_history_and_simulator_bars() -> None:
    from jtrail.bench.routing_report import carry_over

    earlier = {"command": "sim", "bars": {"rr_over_token_aware_mean_e2e_sim8": 1.1, "x_real": 0.9},
               "sim8_replay": {"seed": 11}, "history": [{"command": "old"}]}
    doc = carry_over(earlier, {"command": "new", "table": {}, "bars": {"x_real": 1.2}})
    assert doc["bars"] == {"rr_over_token_aware_mean_e2e_sim8": 1.1, "x_real": 1.2}
    assert doc["history"] == [{"command": "old"}] and doc["sim8_replay"] == {"seed": 11}
    again = carry_over(doc, {"command": "newer", "table": {}, "bars": {}})
    assert [h["command"] for h in again["history"]] == ["old", "new"]
