"""Memory-aware admission and victim choice.

Two admission rules (`mode`), both from the predicted remaining lengths (scaled by `reserve`; 0: only
the pages held now, vLLM-like) and both keeping a watermark of pages untouched:
- "reserve" (Kossmann et al., "half-full" scheduling): admit a waiting request only if, after
  reserving for every running request all the pages its predicted remaining tokens will still need,
  the request's own current and predicted pages fit in the free pages. Every reservation is held at
  once, although short requests finish and free their pages long before long ones peak.
- "peak" (LightLLM's past-future scheduler): admit only if the pages in use stay under the limit at
  every future moment when each request runs to its predicted end, one token per step. Request j holds
  n_j + t tokens at step t <= r_j, so usage peaks just before a finish: at t = r_k it is the sum of
  n_j + r_k over the requests with r_j >= r_k; the peak is the largest of these.
Victim choice: preempt the request that loses the least work (fewest tokens to recompute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...paging import pages_for
from ...sequence import InvalidRequestError, Sequence
from .base import SchedulerState

MODES = ("reserve", "peak")


@dataclass(frozen=True)
class MemoryGuard:
    watermark: float = 0.01  # fraction of all pages kept free
    reserve: float = 1.0  # fraction of predicted remaining tokens to reserve pages for
    mode: str = "reserve"  # "reserve" or "peak" (module docstring)

    def __post_init__(self) -> None:
        if not 0.0 <= self.watermark < 1.0:
            raise InvalidRequestError("watermark", f"must be in [0, 1), got {self.watermark!r}")
        if not self.reserve >= 0.0:
            raise InvalidRequestError("reserve", f"must be >= 0, got {self.reserve!r}")
        if self.mode not in MODES:
            raise InvalidRequestError("mode", f"must be one of {MODES}, got {self.mode!r}")

    def gate(self, state: SchedulerState) -> ReserveGate | PeakGate:
        """This step's admission check over `state`'s running requests (`admit` per candidate)."""
        if self.mode == "peak":
            return PeakGate(self, state.running, state.total_pages, state.page_size)
        return ReserveGate(self, self.budget(state.running, state.free_pages, state.total_pages,
                                             state.page_size), state.page_size)

    def predicted(self, seq: Sequence) -> float:
        """Its predicted remaining tokens (max_tokens left while it has no estimate), at most those."""
        p = seq.predicted_remaining
        return float(seq.max_remaining) if p is None else min(float(p), float(seq.max_remaining))

    def future_pages(self, seq: Sequence, page_size: int) -> int:
        """Pages the sequence will still need beyond what it holds now, by its prediction."""
        n = seq.num_tokens
        extra = math.ceil(self.reserve * self.predicted(seq))
        return pages_for(n + max(extra, 1), page_size) - pages_for(n, page_size)

    def admission_pages(self, seq: Sequence, page_size: int) -> int:
        """Pages to admit the sequence now (its tokens + 1) plus its predicted growth."""
        n = seq.num_tokens
        extra = max(math.ceil(self.reserve * self.predicted(seq)), 1)
        return pages_for(n + extra, page_size)

    def budget(self, running: list[Sequence], free_pages: int, total_pages: int, page_size: int) -> float:
        """Pages available to new admissions after the watermark and the running requests' growth."""
        growth = sum(self.future_pages(s, page_size) for s in running)
        return free_pages - self.watermark * total_pages - growth


class ReserveGate:
    """"reserve": the free pages less the watermark and the running requests' predicted growth."""

    def __init__(self, guard: MemoryGuard, budget: float, page_size: int):
        self.guard, self.budget, self.page_size = guard, budget, page_size

    def admit(self, seq: Sequence, force: bool = False) -> bool:
        """Take `seq`'s pages from the budget if they fit (or `force`); False (nothing taken) if not."""
        need = self.guard.admission_pages(seq, self.page_size)
        if need > self.budget and not force:
            return False
        self.budget -= need
        return True


class PeakGate:
    """"peak": the running (and admitted) requests' future peak of pages stays under the limit."""

    def __init__(self, guard: MemoryGuard, running: list[Sequence], total_pages: int, page_size: int):
        self.guard, self.page_size = guard, page_size
        self.limit = (1.0 - guard.watermark) * total_pages
        self.items = [self._item(s) for s in running]  # (predicted remaining tokens, tokens now)

    def _item(self, seq: Sequence) -> tuple[float, int]:
        return self.guard.reserve * self.guard.predicted(seq), seq.num_tokens + 1

    def peak_pages(self, items: list[tuple[float, int]]) -> float:
        """The largest page count in use before any of `items` finishes (each request's partly filled
        last page counted whole)."""
        peak = tokens = alive = 0.0
        for r, n in sorted(items, reverse=True):  # longest first: at t = r the alive set is those so far
            alive += 1
            tokens += n
            peak = max(peak, (tokens + alive * r) / self.page_size + alive)
        return peak

    def admit(self, seq: Sequence, force: bool = False) -> bool:
        """Count `seq` in if the peak stays under the limit with it (or `force`); False if not."""
        item = self._item(seq)
        if not force and self.peak_pages([*self.items, item]) > self.limit:
            return False
        self.items.append(item)
        return True


def least_work_victim(running: list[Sequence]) -> Sequence:
    """Fewest tokens to recompute; ties: the most recently admitted."""
    return min(running, key=lambda s: (s.num_tokens, -(s.admitted_time or 0.0), -s.arrival_time))
