"""A starvation guard for rank-ordered queues: a request that has waited past a bound goes first.

Requests waiting longer than `factor` x the recent mean end-to-end time (an exponential moving
average over finished requests, weight 1 / `window`) are served first, oldest first; the rest keep
their rank order (SRPT on the predicted length, no aging). The bound comes from the system's state,
not from a constant in seconds: it grows with the load as every request's time in the system does,
so in a light load SRPT's order holds and in an overload the longest waits are cut at a few times
the typical request's. Before any request has finished there is no bound.

Membership changes with time (a request crosses the bound while it waits), so the starving set is
found by a scan of the waiting list at each `schedule`; the rest of the order stays a static heap.
"""

from __future__ import annotations

import math

from ...sequence import InvalidRequestError, Sequence


class StarvationGuard:
    def __init__(self, factor: float = 2.0, window: int = 64):
        if not (factor > 0 and math.isfinite(factor)):
            raise InvalidRequestError("guard", f"must be a finite factor > 0, got {factor!r}")
        if not (isinstance(window, int) and window >= 1):
            raise InvalidRequestError("guard_window", f"must be an int >= 1, got {window!r}")
        self.factor, self.alpha = float(factor), 1.0 / window
        self.mean_e2e: float | None = None

    def on_finish(self, seq: Sequence, now: float) -> None:
        e2e = now - seq.arrival_time
        self.mean_e2e = e2e if self.mean_e2e is None else self.mean_e2e + self.alpha * (e2e - self.mean_e2e)

    def bound(self) -> float:
        """The wait (s) past which a request is starving; inf before any request has finished."""
        return math.inf if self.mean_e2e is None else self.factor * self.mean_e2e

    def starving(self, waiting: list[Sequence], now: float) -> list[Sequence]:
        """Waiting requests past the bound, oldest first."""
        cut = now - self.bound()
        return sorted((s for s in waiting if s.arrival_time < cut),
                      key=lambda s: (s.arrival_time, s.request_id))
