"""Aging against starvation: a waiting request's effective rank improves with its wait.

linear (default):  effective_rank(now) = rank - rate * (now - arrival_time)   (rate in tokens / s)
exp (multiplicative): effective_rank(now) = (rank + 1) * exp(-rate * (now - arrival_time)) - 1
                   (rate in 1 / s: a rank falls by half every ln 2 / rate seconds of waiting)

Why multiplicative: linear aging gives every request the same credit per second, so it reorders
short requests among themselves as much as long ones behind short ones; a relative credit leaves the
order of similar ranks to their ranks and lets only a long wait overcome a large ratio. Its static
key is log(rank + 1) + rate * arrival_time (the log of the effective rank plus rate * now).

Why linear in the arrival time: the ordering key `rank + rate * arrival_time` then differs from the
effective rank by the same `rate * now` for every waiting request, so the waiting queue's order does
not change with time and a heap stays valid (waitqueue.py).

Wait bound: a request with rank R arriving at t0 is ahead of every request with rank >= 0 that arrives
after t0 + R / rate, so once those earlier arrivals have been served it runs next: its wait is bounded
by R / rate plus the work that arrived before t0 + R / rate (finite at load < 1), not unbounded as
under pure SRPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...sequence import InvalidRequestError

AGING_FORMS = ("linear", "exp")


@dataclass(frozen=True)
class Aging:
    rate: float = 0.0  # rank credit per second of waiting (tokens / s, or 1 / s for "exp"); 0: none
    form: str = "linear"

    def __post_init__(self) -> None:
        if not (self.rate >= 0.0) or self.rate == float("inf"):
            raise InvalidRequestError("aging", f"must be a finite rate >= 0, got {self.rate!r}")
        if self.form not in AGING_FORMS:
            raise InvalidRequestError("aging_form", f"must be one of {AGING_FORMS}, got {self.form!r}")

    def static_key(self, rank: float, arrival_time: float) -> float:
        """Time-independent ordering key equivalent to the effective rank."""
        if self.form == "exp":
            return math.log(max(rank, 0.0) + 1.0) + self.rate * arrival_time
        return rank + self.rate * arrival_time

    def effective(self, rank: float, arrival_time: float, now: float) -> float:
        if self.form == "exp":
            return (max(rank, 0.0) + 1.0) * math.exp(-self.rate * (now - arrival_time)) - 1.0
        return rank - self.rate * (now - arrival_time)

