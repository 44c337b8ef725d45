"""Deadline order: earliest deadline first, a request's deadline set once, when its length is known.

    deadline = arrival_time + quantile(rank) x factor x (recent mean end-to-end time)

quantile(rank) is the fraction of the last `window` length estimates below this one (ties count
half): a request predicted shorter than all recent ones has its arrival as deadline, one predicted
longer than all of them gets `factor` mean E2E times of slack. Linear aging is EDF with the deadline
arrival + rank / rate; this replaces the rank by its quantile, so the order does not depend on the
probe's scale (a trained probe's estimates are compressed toward the mean length, a synthetic one's
are not, and the same aging rate then means different orders), and the rate by the recent mean E2E,
so the slack grows with the load instead of being a constant of the trace. The key is fixed once
computed, so the waiting queue stays a static heap (waitqueue.py). Before any request has finished
the slack is 0 (arrival order); a request not yet predicted has its arrival as key until it is.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from ...sequence import InvalidRequestError, Sequence


class DeadlineOrder:
    def __init__(self, factor: float = 2.0, window: int = 256, ewma_window: int = 64):
        if not (factor >= 0 and math.isfinite(factor)):
            raise InvalidRequestError("deadline", f"must be a finite factor >= 0, got {factor!r}")
        self.factor, self.window, self.alpha = float(factor), int(window), 1.0 / ewma_window
        self.mean_e2e: float | None = None
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self._deadline: dict[str, float] = {}

    def quantile(self, rank: float) -> float:
        """Fraction of the recent estimates below `rank` (ties half); 0.5 with none yet."""
        n = len(self._sorted)
        if n == 0:
            return 0.5
        lo, hi = bisect.bisect_left(self._sorted, rank), bisect.bisect_right(self._sorted, rank)
        return (lo + 0.5 * (hi - lo)) / n

    def _observe(self, rank: float) -> None:
        self._recent.append(rank)
        bisect.insort(self._sorted, rank)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def key(self, seq: Sequence, rank: float | None) -> float:
        """The request's deadline (s); fixed at the first call with a known rank."""
        d = self._deadline.get(seq.request_id)
        if d is not None:
            return d
        if rank is None:
            return seq.arrival_time
        slack = 0.0 if self.mean_e2e is None else self.factor * self.mean_e2e
        d = seq.arrival_time + self.quantile(rank) * slack
        self._observe(rank)
        self._deadline[seq.request_id] = d
        return d

    def on_finish(self, seq: Sequence, now: float) -> None:
        self._deadline.pop(seq.request_id, None)
        e2e = now - seq.arrival_time
        self.mean_e2e = e2e if self.mean_e2e is None else self.mean_e2e + self.alpha * (e2e - self.mean_e2e)
