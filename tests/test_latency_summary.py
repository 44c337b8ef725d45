"""The one latency summary (`serving.latency_summary`) against numbers computed independently: plain
Python over the finished requests, with percentiles from numpy's `quantile` and by hand; and the
simulator's and the benchmarks' summaries are that same function on their arrays."""

from __future__ import annotations

import numpy as np
import pytest
from jtrail.serving.latency_summary import summarize_requests
from jtrail.serving.sequence import InvalidRequestError
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

from jtrail.bench.loadgen import RunResult
from jtrail.bench.metrics import summarize

# 5 requests: #2 started but never finished, #4 never started; #3 emitted one token (no TPOT)
ARRIVAL = [0.0, 0.5, 1.0, 2.0, 3.0]
FIRST = [0.4, 1.5, 1.2, 2.1, np.nan]
FINISH = [2.0, 4.5, np.nan, 2.1, np.nan]
TOKENS = [5, 7, 3, 1, 0]
PREEMPT = [1, 2, 3, 0, 0]
ITL = [0.4, 0.4, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]


def _mean_and_quantiles(x: list[float]) -> list[float]:
    return [sum(x) / len(x), *np.quantile(np.array(x), [0.5, 0.9, 0.99], method="linear")]


def test_summary_matches_an_independent_computation() -> None:
    s = summarize_requests(ARRIVAL, FIRST, FINISH, TOKENS, PREEMPT, itl=ITL)
    done = [i for i in range(5) if np.isfinite(FINISH[i])]  # requests 0, 1, 3
    e2e = [FINISH[i] - ARRIVAL[i] for i in done]  # 2.0, 4.0, 0.1
    ttft = [FIRST[i] - ARRIVAL[i] for i in done]  # 0.4, 1.0, 0.1: request 2's 0.2 s is not counted
    tpot = [(FINISH[i] - FIRST[i]) / (TOKENS[i] - 1) for i in done if TOKENS[i] > 1]  # 0.4, 0.5
    for name, x in (("e2e", e2e), ("ttft", ttft), ("tpot", tpot), ("itl", ITL)):
        got = [s[f"{k}_{name}"] for k in ("mean", "p50", "p90", "p99")]
        assert got == pytest.approx(_mean_and_quantiles(x), rel=1e-12), name
    # linear interpolation between order statistics, by hand: sorted E2E 0.1, 2.0, 4.0
    assert s["p90_e2e"] == pytest.approx(2.0 + 0.8 * 2.0) and s["p50_e2e"] == pytest.approx(2.0)
    assert s["requests"] == 5 and s["completed"] == 3
    assert s["makespan_s"] == pytest.approx(4.5)  # first arrival 0.0 to last finish 4.5
    assert s["throughput_tok_s"] == pytest.approx((5 + 7 + 1) / 4.5)  # finished requests' tokens
    assert s["throughput_req_s"] == pytest.approx(3 / 4.5)
    assert s["preemptions_per_request"] == pytest.approx(6 / 5)  # over every request sent
    assert s["output_tokens"] == 16


def test_no_itl_keys_without_samples_and_nan_without_finished_requests() -> None:
    s = summarize_requests([0.0, 1.0], [np.nan, np.nan], [np.nan, np.nan], [0, 0], [0, 1])
    assert not any(k.endswith("_itl") for k in s)
    assert s["completed"] == 0 and np.isnan(s["mean_e2e"]) and np.isnan(s["p99_ttft"])
    assert np.isnan(s["throughput_tok_s"]) and np.isnan(s["makespan_s"])  # never a 0 that reads as measured
    assert s["preemptions_per_request"] == pytest.approx(0.5)
    explicit = summarize_requests(ARRIVAL, FIRST, FINISH, TOKENS, PREEMPT, completed=[1, 1, 0, 0, 0])
    assert explicit["completed"] == 2 and explicit["mean_e2e"] == pytest.approx(3.0)


def test_mismatched_arrays_name_the_field() -> None:
    with pytest.raises(InvalidRequestError, match="finish"):
        summarize_requests([0.0, 1.0], [0.5, 1.5], [1.0], [2, 2], [0, 0])
    with pytest.raises(InvalidRequestError, match="completed"):
        summarize_requests([0.0], [0.5], [1.0], [2], [0], completed=[True, False])


def test_simulator_and_benchmark_summaries_are_the_same_function() -> None:
    rng = np.random.default_rng(0)
    n = 40
    tr = Trace(np.cumsum(rng.exponential(0.05, n)), rng.integers(1, 60, n), rng.integers(1, 30, n))
    r = simulate(tr, "fcfs", StepModel(a=0.01, b=1e-4), Resources(num_slots=4, num_pages=40, page_size=16))
    s = r.summary()
    a = tr.arrival
    ref = summarize_requests(a, a + r.ttft, a + r.e2e, tr.output_len, r.preemptions)
    assert s == ref
    assert s["mean_e2e"] == pytest.approx(r.e2e.mean(), rel=1e-9)
    assert s["p99_tpot"] == pytest.approx(np.percentile(r.tpot[tr.output_len > 1], 99), rel=1e-9)
    assert s["makespan_s"] == pytest.approx(r.makespan, rel=1e-12)
    run = RunResult(np.array(ARRIVAL), np.array(FIRST), np.array(FINISH), np.array(TOKENS), np.array(PREEMPT),
                    np.array(ITL), np.zeros((0, 9)), wall_s=7.0)
    assert summarize(run) == {**summarize_requests(ARRIVAL, FIRST, FINISH, TOKENS, PREEMPT, itl=ITL),
                              "wall_s": 7.0}
