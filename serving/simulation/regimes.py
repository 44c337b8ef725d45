"""The serving regimes of issue 15: one definition for the simulator and the GPU benchmark.

    from jtrail.serving.simulation.regimes import REGIMES, regime_arrivals, regime_resources

- R1 stable: Poisson at 0.9 of capacity, 32 slots, 2,048 pages.
- R2 overload: Poisson at 1.3x capacity for 45 s, then 0.6x for 45 s, then drained (the phases set the
  request count: ~86 x capacity, wrapping the pool if it is smaller; `n_max` caps it), 32 slots, 2,048
  pages. Until 2026-12-03 R2 stopped at 1,400 requests, sized for a 24 req/s engine: at 40 req/s that
  cut the overload to 26 s and left out the 0.6x phase (simulator, results/sim_r2_full.json: srpt-oracle
  2.27x fcfs mean E2E with the cut, 2.55x as specified).
- R3 memory-bound: 64 slots, KV pages for about 16 average requests ((mean prompt + mean answer)
  tokens / page size x 16), Poisson at 0.9 of capacity. Baseline: fcfs with vLLM's free-page
  watermark on admission (`make_policy("fcfs", watermark=0.01)`).

Capacity is per regime: it is measured on that regime's resources (`brain/capacity.py`: full-batch
output tokens/s over mean output tokens; for R3 the batch is memory-bound, so "full" means requests
were waiting, `backlog=True`). `regime_arrivals` turns it into arrival times for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Regime:
    name: str
    description: str
    num_slots: int
    num_pages: int | None  # None: sized from the workload (regime_resources)
    phases: tuple[tuple[float, float], ...]  # (load as a fraction of capacity, seconds; inf: until n_max)
    default_requests: int | None  # None: the (finite) phases alone decide
    fcfs_kwargs: dict[str, Any] = field(default_factory=dict)  # the baseline's options
    backlog_capacity: bool = False  # capacity counts steps with requests waiting as full (memory-bound)
    requests_in_kv: float | None = None  # R3: the KV cache holds this many average requests


REGIMES: dict[str, Regime] = {
    "R1": Regime("R1", "stable: Poisson at 0.9 of capacity, 32 slots", 32, 2048, ((0.9, np.inf),), 600),
    "R2": Regime("R2", "overload: Poisson at 1.3x capacity for 45 s, then 0.6x for 45 s, 32 slots", 32, 2048,
                 ((1.3, 45.0), (0.6, 45.0)), None),
    "R3": Regime("R3", "memory-bound: 64 slots, KV pages for ~16 average requests, 0.9 load; fcfs with a "
                 "vLLM free-page watermark", 64, None, ((0.9, np.inf),), 600,
                 fcfs_kwargs={"watermark": 0.01}, backlog_capacity=True, requests_in_kv=16.0),
}


def regime_resources(name: str, mean_prompt: float, mean_output: float,
                     page_size: int = 16) -> dict[str, int]:
    """Slots, pages and page size of a regime for a workload's mean prompt and answer lengths."""
    r = _get(name)
    pages = r.num_pages
    if pages is None:
        assert r.requests_in_kv is not None
        pages = int(round(r.requests_in_kv * (mean_prompt + mean_output) / page_size))
    return {"num_slots": r.num_slots, "num_pages": pages, "page_size": page_size}


def regime_arrivals(name: str, capacity_req_s: float, seed: int, n_max: int | None = None) -> np.ndarray:
    """Arrival times (s, from 0) of a regime: Poisson phases at fractions of `capacity_req_s`, at most
    `n_max` requests (default: the regime's `default_requests`; None: no cap, the phases decide). A phase
    of infinite length runs until n_max; finite phases end at their time even when fewer than n_max
    requests arrived."""
    r = _get(name)
    if not (np.isfinite(capacity_req_s) and capacity_req_s > 0):
        raise ValueError(f"capacity_req_s must be a finite rate > 0, got {capacity_req_s!r}")
    n_max = r.default_requests if n_max is None else int(n_max)
    if n_max is None:
        if not all(np.isfinite(secs) for _, secs in r.phases):
            raise ValueError(f"regime {name} has an open-ended phase: pass n_max")
        n_max = np.iinfo(np.int64).max
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    rng = np.random.default_rng(seed)
    out: list[float] = []
    t0 = 0.0
    for load, secs in r.phases:
        rate = load * capacity_req_s
        end = t0 + secs
        t = t0
        while len(out) < n_max:
            t += float(rng.exponential(1.0 / rate))
            if t >= end:
                break
            out.append(t)
        if len(out) >= n_max:
            break
        t0 = end
    return np.asarray(out, dtype=np.float64)


def _get(name: str) -> Regime:
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; choose from {sorted(REGIMES)}")
    return REGIMES[name]
