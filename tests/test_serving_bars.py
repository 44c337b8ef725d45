"""The replay benchmark's bars (jtrail.bench.serving_regimes.bars_of): ratios of the runs' latency
summaries, computed by hand here; NaN when a run left requests unfinished or when the runs' step times
drifted apart (the host's speed, not the policy, would make the ratio); `--trail-label` picks the run
that stands for trail."""
from __future__ import annotations

import math

import pytest

from jtrail.bench.serving_regimes import STEP_DRIFT_LIMIT, bars_of, step_time_spread


def run(mean_e2e: float, mean_ttft: float, p99: float, step_ms: float, done: int = 100,
        preemptions: float = 0.0) -> dict:
    return {"mean_e2e": mean_e2e, "mean_ttft": mean_ttft, "p99_e2e": p99, "median_decode_step_ms": step_ms,
            "completed": done, "requests": 100, "preemptions_per_request": preemptions}


def test_ratios_come_from_the_labelled_trail_run() -> None:
    runs = {"fcfs": run(6.0, 4.0, 20.0, 2.50),
            "trail-host-preempt": run(3.0, 1.0, 22.0, 2.55, preemptions=0.3),
            "srpt-oracle": run(2.0, 0.5, 30.0, 2.52)}
    bars = bars_of("R2", runs, trail_label="trail-host-preempt")
    assert bars["r2_fcfs_over_trail_mean_e2e"] == pytest.approx(2.0)
    assert bars["r2_fcfs_over_trail_mean_ttft"] == pytest.approx(4.0)
    assert bars["r2_trail_over_fcfs_p99_e2e"] == pytest.approx(1.1)
    assert bars["r2_trail_over_oracle_mean_e2e"] == pytest.approx(1.5)
    assert bars["r2_trail_preemptions_per_request"] == 0.3
    assert bars["r2_step_time_spread"] == pytest.approx(2.55 / 2.50)
    # without a run labelled "trail" the default label finds nothing
    assert math.isnan(bars_of("R2", runs)["r2_fcfs_over_trail_mean_e2e"])


def test_step_time_drift_or_an_unfinished_run_voids_the_ratios() -> None:
    slow = 2.50 * (STEP_DRIFT_LIMIT + 0.02)
    drifted = {"fcfs": run(6.0, 4.0, 20.0, 2.50), "trail": run(3.0, 1.0, 22.0, slow)}
    bars = bars_of("R1", drifted)
    assert math.isnan(bars["r1_fcfs_over_trail_mean_e2e"])
    assert bars["r1_step_time_spread"] == pytest.approx(slow / 2.50)
    assert bars_of("R1", drifted, drift_limit=0)["r1_fcfs_over_trail_mean_e2e"] == pytest.approx(2.0)
    unfinished = {"fcfs": run(6.0, 4.0, 20.0, 2.50), "trail": run(3.0, 1.0, 22.0, 2.50, done=99)}
    assert math.isnan(bars_of("R1", unfinished)["r1_fcfs_over_trail_mean_e2e"])


def test_spread_is_not_checked_without_two_full_batch_medians() -> None:
    # a memory-bound regime (R3) may never fill its slots: no median, nothing to compare
    assert math.isnan(step_time_spread({"fcfs": run(1, 1, 1, float("nan")), "trail": run(1, 1, 1, 2.0)}))
    runs = {"fcfs": run(2.0, 1.0, 5.0, float("nan")), "trail": run(1.0, 0.5, 5.0, float("nan"))}
    assert bars_of("R3", runs)["r3_fcfs_over_trail_mean_e2e"] == pytest.approx(2.0)
