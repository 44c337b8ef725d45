"""Capacity from step records, its queueing sanity on the simulator, and the regimes' arrival shapes."""

import numpy as np
import pytest
from jtrail.serving.brain.capacity import StepRecord, capacity_req_s, full_batch_throughput
from jtrail.serving.sequence import InvalidRequestError
from jtrail.serving.simulation.regimes import REGIMES, regime_arrivals, regime_resources
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel


def synthetic_record():
    # ramp: 10 steps of 0.01 s with 1..10 running; full: 100 steps of 0.02 s, 10 running, 10 tokens
    # each (500 tok/s); drain: 20 steps of 0.01 s with 9..1 running, plus an idle gap of 5 s.
    run = np.r_[np.arange(1, 11), np.full(100, 10), np.linspace(9, 1, 20).round()]
    sec = np.r_[np.full(10, 0.01), np.full(100, 0.02), np.full(20, 0.01)]
    end = np.cumsum(sec)
    end[110:] += 5.0  # idle before the drain: must not count
    return run, sec, end


def test_capacity_counts_only_full_batch_steps():
    run, sec, end = synthetic_record()
    rec = StepRecord(end_time=end, running=run, tokens_out=run, seconds=sec)
    tp = full_batch_throughput(rec, num_slots=10)
    # full rows: ramp's last step (10 running, 0.01 s, 10 tokens) + the 100 full steps
    assert tp["full_rows"] == 101
    assert tp["tokens_per_s"] == pytest.approx(1010 / 2.01)
    assert capacity_req_s(rec, 10, mean_output_tokens=50.0) == pytest.approx(1010 / 2.01 / 50)
    # from end times alone: row i lasts end[i] - end[i-1] (the idle gap falls in a non-full row)
    rec2 = StepRecord(end_time=end, running=run, tokens_out=run)
    assert full_batch_throughput(rec2, 10)["tokens_per_s"] == pytest.approx(1010 / 2.01)
    # a makespan-based figure would say 1,100 + ... tokens over 7.3 s: far lower
    assert run.sum() / end[-1] < 0.4 * tp["tokens_per_s"]


def test_capacity_backlog_and_errors():
    rec = StepRecord(end_time=[1, 2, 3], running=[3, 3, 3], tokens_out=[3, 3, 3], seconds=[1, 1, 1],
                     waiting=[0, 2, 1])
    with pytest.raises(InvalidRequestError, match="full-batch"):
        full_batch_throughput(rec, num_slots=8)
    assert full_batch_throughput(rec, num_slots=8, backlog=True)["full_rows"] == 2
    with pytest.raises(InvalidRequestError, match="running"):
        StepRecord(end_time=[1, 2], running=[1], tokens_out=[1, 1])
    with pytest.raises(InvalidRequestError, match="end_time"):
        StepRecord(end_time=[2, 1], running=[1, 1], tokens_out=[1, 1])
    with pytest.raises(InvalidRequestError, match="waiting"):
        full_batch_throughput(StepRecord(end_time=[1], running=[1], tokens_out=[1]), 1, backlog=True)


SM = StepModel(a=0.01, b=1e-4, c=1e-6, d=0.005)
RES = Resources(num_slots=32, num_pages=8192, page_size=16)


def lengths(n, seed):
    rng = np.random.default_rng(seed)
    out = np.clip(np.round(rng.lognormal(np.log(100), 0.9, n)), 1, 1000).astype(int)
    return rng.integers(10, 200, n), out


def test_capacity_queueing_sanity_on_the_simulator():
    prm, out = lengths(3000, 0)
    sat = simulate(Trace(np.zeros(1500), prm[:1500], out[:1500]), "fcfs", SM, RES, record_steps=True)
    cap = capacity_req_s(sat.steps[0], RES.num_slots, float(out.mean()))
    full_step = float(np.median(sat.steps[0].seconds / sat.steps[0].steps))  # one step of a full batch
    rng = np.random.default_rng(1)

    def ttft(load, n):
        tr = Trace(np.cumsum(rng.exponential(1 / (load * cap), n)), prm[:n], out[:n])
        return simulate(tr, "fcfs", SM, RES).ttft

    low = ttft(0.7, 3000)
    assert low.mean() < 5 * full_step  # a stable queue: within a few steps of the first token
    a, b = ttft(1.2, 1000).mean(), ttft(1.2, 3000).mean()
    assert a > 50 * full_step and b > 2.2 * a  # past capacity: grows with the trace, ~linearly


def test_regime_arrival_shapes():
    cap = 20.0
    r1 = regime_arrivals("R1", cap, seed=0, n_max=4000)
    assert len(r1) == 4000 and np.all(np.diff(r1) >= 0)
    assert 4000 / r1[-1] == pytest.approx(0.9 * cap, rel=0.05)
    r2 = regime_arrivals("R2", cap, seed=0, n_max=10_000)
    first = np.sum(r2 < 45.0)
    assert first == pytest.approx(1.3 * cap * 45, rel=0.1)  # Poisson: sd ~ 34 of 1,170
    second = np.sum(r2 >= 45.0)
    assert second == pytest.approx(0.6 * cap * 45, rel=0.15)
    assert r2[-1] < 90.0
    assert len(regime_arrivals("R2", cap, seed=0, n_max=500)) == 500
    # by default R2's two 45 s phases set the count (not a cap sized for one engine's capacity)
    assert np.array_equal(regime_arrivals("R2", cap, seed=0), r2)
    assert len(regime_arrivals("R2", 2 * cap, seed=0)) == pytest.approx(2 * len(r2), rel=0.05)
    assert np.array_equal(regime_arrivals("R2", cap, 3, 100), regime_arrivals("R2", cap, 3, 100))
    res = regime_resources("R3", mean_prompt=108, mean_output=292)
    assert res == {"num_slots": 64, "num_pages": 400, "page_size": 16}  # 16 x 400 tokens / 16
    assert regime_resources("R1", 108, 292)["num_pages"] == 2048
    assert REGIMES["R3"].fcfs_kwargs == {"watermark": 0.01}
    with pytest.raises(ValueError, match="unknown regime"):
        regime_arrivals("R9", cap, 0)
    with pytest.raises(ValueError, match="capacity"):
        regime_arrivals("R1", 0.0, 0)


def test_a_one_time_pause_is_not_throughput() -> None:
    """Full batch of 32 at 6 ms a step, 32 tokens each, and one 4 s compile in the window: capacity
    is 32 / 6 ms, not (tokens) / (window with the pause)."""
    n = 1000
    secs = np.full(n, 0.006)
    secs[[10, 500]] = 4.0
    full = np.full(n, 32)
    rec = StepRecord(end_time=np.cumsum(secs), running=full, tokens_out=full, seconds=secs)
    tp = full_batch_throughput(rec, 32)
    assert tp["tokens_per_s"] == pytest.approx(32 / 0.006)
    assert tp["stalls_excluded"] == 2 and tp["stall_seconds"] == pytest.approx(8.0)
    with_pauses = full_batch_throughput(rec, 32, stall_factor=0)["tokens_per_s"]
    assert with_pauses == pytest.approx(32 * n / secs.sum())


def test_pauses_are_compiles_not_long_steps() -> None:
    """One rule for capacity, the step-model fit and the runs' stall counts: over 20 x the median
    step and over 1 s. A 0.15 s prefill step beside 5 ms decode steps is work, a 4 s compile is not."""
    from jtrail.serving.brain.capacity import pauses

    secs = np.r_[np.full(100, 0.005), 0.15, 4.0]
    assert pauses(secs).tolist() == [False] * 101 + [True]
    assert not pauses(secs, factor=0).any() and not pauses(np.array([])).any()
