"""The benchmark harness's library pieces (jtrail.bench, serving.simulation) that the scripts in
benchmarks/ used to hold: the burst capacity of a profiling run, the front-door summary over finished
requests, and the step-model fit on recorded steps, each against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from jtrail.serving.simulation.step_model import fit_step_model

from jtrail.bench.loadgen import RunResult
from jtrail.bench.metrics import burst_capacity, summarize


def _run(finish: list[float], first: list[float], nout: list[int]) -> RunResult:
    n = len(finish)
    return RunResult(arrival=np.zeros(n), first_token=np.array(first, float), finish=np.array(finish, float),
                     output_tokens=np.array(nout), preemptions=np.zeros(n, int), itl=np.zeros(0),
                     steps=np.zeros((0, 9)), wall_s=10.0)


def test_burst_capacity_leaves_out_the_tail_where_batches_empty() -> None:
    # 8 finished (the last two late: the tail), one unfinished, one finished with no output
    res = _run([1, 2, 3, 4, 5, 6, 10, 20, np.nan, 9], [0.5] * 10, [3] * 9 + [0])
    ok, cap = burst_capacity(res, total_slots=2)
    assert ok.tolist() == [True] * 8 + [False, False]
    assert cap == pytest.approx(6 / 6.0)  # the 6th finish at t = 6: the last 2 (the tail) left out
    _, cap = burst_capacity(res, total_slots=5)  # would leave 3 of 8 (< half): all 8 count
    assert cap == pytest.approx(8 / 20.0)
    _, cap = burst_capacity(_run([np.nan], [np.nan], [0]), total_slots=1)
    assert np.isnan(cap)


def test_front_door_summary_counts_finished_requests_only() -> None:
    res = _run([2.0, 4.0, np.nan], [1.0, 1.0, 0.5], [4, 4, 1])
    row = summarize(res)
    assert row["completed"] == 2 and row["requests"] == 3 and row["wall_s"] == 10.0
    assert row["mean_e2e"] == pytest.approx(3.0) and row["p50_e2e"] == pytest.approx(3.0)
    assert row["mean_ttft"] == pytest.approx(1.0)  # the unfinished request's 0.5 s TTFT is left out
    assert row["p99_e2e"] == pytest.approx(2.0 + 0.99 * 2.0)


def test_step_model_fit_recovers_the_coefficients_one_call_per_prefill_step_no_pauses() -> None:
    rng = np.random.default_rng(0)
    bt = rng.integers(1, 512, 400).astype(float)
    kv = rng.integers(100, 20_000, 400).astype(float)
    chunks = rng.integers(0, 3, 400).astype(float)  # recorded per step; the engine packs them in one call
    secs = 4e-3 + 2e-6 * bt + 1e-7 * kv + 3e-3 * (chunks > 0)  # exact: no noise
    secs[7] = 5.0  # a compile: a pause, not the steady cost
    idle = np.zeros((3, 9))  # steps that computed nothing are dropped
    steps = np.vstack([np.column_stack([bt, kv, secs, chunks, np.zeros((400, 5))]), idle])
    sm, info = fit_step_model(steps)
    assert (sm.a, sm.b, sm.c, sm.d) == pytest.approx((4e-3, 2e-6, 1e-7, 3e-3), rel=1e-6)
    assert info["stalls_excluded"] == 1 and info["steps"] == 399
    assert info["r2"] == pytest.approx(1.0) and abs(info["total_time_rel_error"]) < 1e-9


def test_async_compare_saves_every_row_and_the_file_survives_a_cut(tmp_path) -> None:
    """--async-compare's result is written after each row (complete false until the end), the sync
    row's token ids (kept for the comparison) never reach the file, and each write replaces the file
    whole."""
    import json

    from jtrail.bench.engine_async import Progress
    from jtrail.bench.engine_decode import write_result

    out = tmp_path / "engine_async.json"
    seen: list[dict] = []

    def emit(result: dict) -> None:
        write_result(result, str(out), None, "engine_async.json")
        seen.append(json.loads(out.read_text()))

    prog = Progress({"shape": "tiny"}, emit)
    prog.result["decode_rows"]["b32_k1_sync"] = {"tokens_per_s": 1.0}
    prog.part("decode b32_k1_sync", 0.5)
    prog.save()
    prog.result["mixed"]["fcfs"] = {"requests": 2, "sync": {"wall_s": 1.0, "outputs": {"t0": [5, 6]}}}
    prog.save()
    assert [s["complete"] for s in seen] == [False, False]
    assert seen[0]["decode_rows"] == {"b32_k1_sync": {"tokens_per_s": 1.0}}
    assert seen[0]["part_seconds"] == {"decode b32_k1_sync": 0.5}
    assert seen[1]["mixed"]["fcfs"]["sync"] == {"wall_s": 1.0}  # token ids left out of the file
    assert prog.result["mixed"]["fcfs"]["sync"]["outputs"] == {"t0": [5, 6]}  # kept in memory
    prog.save(complete=True)
    assert seen[-1]["complete"] is True and not list(tmp_path.glob("*.tmp"))
