"""Slot forecasts: when each of a replica's batch slots frees up, from its own requests' predicted
lengths. Each engine reports its forecast in its stats (`LLMEngine.stats`, the simulator's replicas) and
the token-aware router (router.py) reads it; it lives here so that an engine never imports the router.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable
from typing import Any

from ..engine_api import EngineStats
from ..sequence import InvalidRequestError

# A waiting queue longer than this is list-scheduled for its first entries only; the rest is spread
# evenly over the slots (keeps the per-step cost of the engine's stats bounded).
MAX_LISTED = 64
# Output tokens assumed for a request with no prediction until a replica has finished one.
FORECAST_PRIOR_TOKENS = 256.0


def slot_forecast(running_remaining: Iterable[float], waiting_tokens: Iterable[float], num_slots: int,
                  max_listed: int = MAX_LISTED) -> list[float]:
    """Decode steps until each of a replica's `num_slots` batch slots is free for a new arrival,
    ascending: a running request frees its slot after its remaining tokens; each request queued
    ahead of the arrival (in admission order) takes the earliest free slot for its predicted output
    tokens (at least one step). Past `max_listed` queued requests, the rest add their total / slots
    to every slot (the list schedule's average)."""
    if num_slots < 1:
        raise InvalidRequestError("num_slots", f"must be >= 1, got {num_slots}")
    free = [max(float(r), 0.0) for r in running_remaining]
    if len(free) > num_slots:
        raise InvalidRequestError("running_remaining", f"{len(free)} running requests for {num_slots} slots")
    free = sorted(free + [0.0] * (num_slots - len(free)))  # sorted: a valid heap
    rest = 0.0
    for i, w in enumerate(waiting_tokens):
        w = max(float(w), 1.0)
        if i < max_listed:
            heapq.heapreplace(free, free[0] + w)
        else:
            rest += w
    return sorted(f + rest / num_slots for f in free)


def replica_forecast(running: Iterable[Any], waiting: Iterable[Any], num_slots: int, prior_tokens: float,
                     length_ranked: bool) -> list[float]:
    """`slot_forecast` from a replica's own requests (objects with `predicted_remaining`).

    A request with no prediction counts `prior_tokens` (the replica's mean output length so far, not
    its max_tokens: with forced lengths max_tokens would leak the true length). Queued ahead of a new
    arrival: every waiting request (fcfs, priority), or for length-ranked policies (trail, srpt,
    gittins) those predicted no longer than a typical arrival (`prior_tokens`), shortest first."""
    def size(s: Any) -> float:
        p = s.predicted_remaining
        return prior_tokens if p is None else float(p)

    ahead = [size(s) for s in waiting]
    if length_ranked:
        ahead = sorted(w for w in ahead if w <= prior_tokens)
    return slot_forecast([size(s) for s in running], ahead, num_slots)


def count_routed(s: EngineStats, prompt_tokens: int, expected_tokens: float) -> EngineStats:
    """The snapshot after one more request was sent to the replica (until the next poll replaces it):
    one more waiting, its prompt and expected output in the outstanding tokens, and in the slot
    forecast it takes the earliest free slot for `expected_tokens` decode steps."""
    free = sorted(s.slot_free_tokens)
    if free:
        free[0] += max(expected_tokens, 1.0)
        free.sort()
    return dataclasses.replace(s, waiting=s.waiting + 1, slot_free_tokens=free,
                               outstanding_tokens=s.outstanding_tokens + prompt_tokens + expected_tokens)
