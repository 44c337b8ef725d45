"""Metrics of one benchmark run: its latency summary (`summarize`, the library's
`serving.latency_summary.summarize_requests` on a `RunResult`, which holds vLLM's definitions), the
burst capacity of a profiling run, and small helpers for the reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jtrail.serving.latency_summary import summarize_requests


def summarize(res: Any) -> dict[str, float]:
    """The summary of a `jtrail.bench.loadgen.RunResult` (in-process or front-door run; seconds,
    tokens/s): latencies over the finished requests, with the run's wall time (`wall_s`)."""
    out = summarize_requests(res.arrival, res.first_token, res.finish, res.output_tokens, res.preemptions,
                             completed=res.completed, itl=res.itl)
    out["wall_s"] = float(res.wall_s)
    return out


def burst_capacity(res: Any, total_slots: int) -> tuple[np.ndarray, float]:
    """(requests that finished with output, requests/s) of a run with every request sent at t=0:
    completions per second up to the k-th, k leaving out the last `total_slots` finishes (the tail
    where batches are no longer full), unless that leaves less than half (a pool not much larger than
    the slots): then all of them."""
    ok = res.completed & (res.output_tokens > 0)
    fin = np.sort(res.finish[ok])
    k = len(fin) - total_slots
    if k < len(fin) // 2:
        k = len(fin)
    return ok, float(k / fin[k - 1]) if len(fin) else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b, NaN when undefined (so a missing number never reads as a pass)."""
    return float(a / b) if b and np.isfinite(a) and np.isfinite(b) else float("nan")


def cdf_points(x: np.ndarray, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, cumulative fraction), thinned to at most max_points for small plots/JSON."""
    x = np.sort(np.asarray(x, float)[np.isfinite(x)])
    if len(x) == 0:
        return x, x
    idx = np.unique(np.linspace(0, len(x) - 1, min(max_points, len(x))).astype(int))
    return x[idx], (idx + 1) / len(x)
