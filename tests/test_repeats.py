"""Repeated benchmark runs (`jtrail.bench.repeats`): mirrored run order, pooled results, averaged
summaries with each repeat's figures kept."""

from __future__ import annotations

import numpy as np
import pytest

from jtrail.bench.loadgen import RunResult
from jtrail.bench.metrics import summarize
from jtrail.bench.repeats import concat_results, mean_repeats, mirrored_order


def test_mirrored_order_gives_every_label_the_same_mean_position() -> None:
    order = mirrored_order(["a", "b", "c"], 2)
    assert order == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1)]
    assert mirrored_order(["a", "b"], 3, reverse_first=True) == [
        ("b", 0), ("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 2)]
    positions = {label: [] for label in "abcd"}
    for i, (label, _) in enumerate(mirrored_order(list("abcd"), 2)):
        positions[label].append(i)
    assert len({np.mean(p) for p in positions.values()}) == 1  # a linear drift falls on all alike
    assert mirrored_order(["a"], 1) == [("a", 0)]


def _run(seed: int, n: int = 50) -> RunResult:
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0, 5, n))
    first = arrival + rng.uniform(0.01, 0.5, n)
    finish = first + rng.uniform(0.1, 2.0, n)
    steps = rng.uniform(0, 1, (7, 9))
    return RunResult(arrival, first, finish, rng.integers(1, 100, n).astype(float), np.zeros(n),
                     rng.uniform(0.001, 0.01, 3 * n), steps, float(finish.max()))


def test_pooled_results_hold_every_request_and_step() -> None:
    runs = [_run(1), _run(2)]
    pooled = concat_results(runs)
    assert len(pooled.arrival) == 100 and pooled.steps.shape == (14, 9)
    assert pooled.wall_s == pytest.approx(runs[0].wall_s + runs[1].wall_s)
    e2e = np.concatenate([r.finish - r.arrival for r in runs])
    # equal-sized repeats: the pooled mean is the mean of the repeats' means
    assert summarize(pooled)["mean_e2e"] == pytest.approx(float(np.mean(e2e)))
    assert summarize(pooled)["mean_e2e"] == pytest.approx(np.mean([summarize(r)["mean_e2e"] for r in runs]))


def test_mean_repeats_averages_and_keeps_each_repeat() -> None:
    rows = [{"mean_e2e": 1.0, "p99_e2e": 4.0, "completed": 10, "requests": 10, "note": "x"},
            {"mean_e2e": 3.0, "p99_e2e": 6.0, "completed": 9, "requests": 10, "note": "y"}]
    out = mean_repeats(rows, ("mean_e2e", "p99_e2e"))
    assert out["mean_e2e"] == 2.0 and out["p99_e2e"] == 5.0
    assert out["completed"] == 19 and out["requests"] == 20  # a lost request stays visible
    assert out["mean_e2e_per_repeat"] == [1.0, 3.0] and out["p99_e2e_per_repeat"] == [4.0, 6.0]
    assert "note" not in out
