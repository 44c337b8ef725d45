"""Aging against starvation: a waiting request's effective rank improves linearly with its wait.

effective_rank(now) = rank - rate * (now - arrival_time)   (rank in tokens, rate in tokens / second)

Why linear in the arrival time: the ordering key `rank + rate * arrival_time` then differs from the
effective rank by the same `rate * now` for every waiting request, so the waiting queue's order does
not change with time and a heap stays valid (waitqueue.py).

Wait bound: a request with rank R arriving at t0 is ahead of every request with rank >= 0 that arrives
after t0 + R / rate, so once those earlier arrivals have been served it runs next: its wait is bounded
by R / rate plus the work that arrived before t0 + R / rate (finite at load < 1), not unbounded as
under pure SRPT.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...sequence import InvalidRequestError


@dataclass(frozen=True)
class Aging:
    rate: float = 0.0  # tokens of rank credit per second of waiting; 0 disables aging

    def __post_init__(self) -> None:
        if not (self.rate >= 0.0) or self.rate == float("inf"):
            raise InvalidRequestError("aging", f"must be a finite rate >= 0, got {self.rate!r}")

    def static_key(self, rank: float, arrival_time: float) -> float:
        """Time-independent ordering key equivalent to the effective rank."""
        return rank + self.rate * arrival_time

    def effective(self, rank: float, arrival_time: float, now: float) -> float:
        return rank - self.rate * (now - arrival_time)

