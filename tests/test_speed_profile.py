"""The simulator's host-speed profile (serving/simulation/step_model.py: TimedStepModel,
fit_speed_profile): recorded step rows whose seconds drift are read back as the drift, and a run under a
scaled model takes the scaled time (hand arithmetic on one request)."""
from __future__ import annotations

import numpy as np
import pytest
from jtrail.serving.sequence import InvalidRequestError
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel, TimedStepModel, fit_speed_profile


def step_rows(seconds: np.ndarray, start: np.ndarray, running: int = 4, kv: float = 400.0) -> np.ndarray:
    """loadgen's step columns: batch tokens, kv tokens, seconds, prefill chunks, decode rows, emitted,
    start time, running, waiting."""
    n = len(seconds)
    return np.column_stack([np.full(n, running), np.full(n, kv), seconds, np.zeros(n), np.full(n, running),
                            np.full(n, running), start, np.full(n, running), np.zeros(n)])


def test_the_profile_reads_back_a_drift() -> None:
    sm = StepModel(a=0.002)
    # 10 s at the model's speed, then 10 s 1.5x slower, then nothing recorded for 5 s, then 0.8x
    t1 = np.arange(0, 10, 0.002)
    t2 = 10 + np.arange(0, 10, 0.003)
    t3 = 25 + np.arange(0, 5, 0.0016)
    rows = np.vstack([step_rows(np.full(len(t1), 0.002), t1), step_rows(np.full(len(t2), 0.003), t2),
                      step_rows(np.full(len(t3), 0.0016), t3)])
    prof = fit_speed_profile(rows, sm, window_s=5.0)
    assert prof.scale == pytest.approx((1.0, 1.0, 1.5, 1.5, 1.5, 0.8), abs=1e-3)  # window 4 empty: 1.5 held
    assert prof.at(7.0).a == pytest.approx(0.002) and prof.at(12.0).a == pytest.approx(0.003)
    assert prof.at(-1.0).a == prof.at(0.0).a and prof.at(1e6).a == pytest.approx(0.0016)


def test_a_request_runs_at_the_speed_of_its_window() -> None:
    # one request, 1,000 decode steps of 2 ms at speed 1: 2 s; starting in a 2x window: 4 s
    sm = StepModel(a=0.002)
    res = Resources(num_slots=1, num_pages=200, page_size=16)
    for at, factor in ((0.0, 1.0), (100.0, 2.0)):
        tr = Trace(np.array([at]), np.array([1]), np.array([1000]))
        timed = TimedStepModel(sm, 50.0, (1.0, 1.0, 2.0))
        e2e = simulate(tr, "fcfs", timed, res).summary()["mean_e2e"]
        assert e2e == pytest.approx(1000 * 0.002 * factor, rel=1e-3)


def test_bad_profiles() -> None:
    with pytest.raises(InvalidRequestError, match="window_s"):
        TimedStepModel(StepModel(a=0.001), 0.0, (1.0,))
    with pytest.raises(InvalidRequestError, match="scale"):
        TimedStepModel(StepModel(a=0.001), 5.0, (1.0, float("nan")))
    with pytest.raises(InvalidRequestError, match="scale"):
        TimedStepModel(StepModel(a=0.001), 5.0, ())


def test_speed_against_a_reference_reads_a_policys_own_step_cost() -> None:
    from jtrail.serving.simulation.step_model import speed_against

    sm = StepModel(a=0.001, b=1e-5, c=1e-7)
    rng = np.random.default_rng(0)
    kv = rng.uniform(1e3, 2e4, 600)
    own = step_rows(np.zeros(600), np.arange(600) * 0.003, running=32)
    own[:, 1] = kv
    own[:, 2] = 1.1 * sm.step_time(own[:, 0], kv, np.zeros(600))  # 10% slower, batch for batch
    own[::10, 3], own[::10, 2] = 1, 0.02  # prefill steps: left out whatever they cost
    own[5, 2] = 3.0  # a pause (a compile): left out
    assert speed_against(own, sm) == pytest.approx(1.1)
    assert np.isnan(speed_against(own[::10], sm))  # no decode-only step
