"""Memory-aware admission and victim choice (Kossmann et al., "half-full" scheduling).

Admission: admit a waiting request only if, after reserving for every running request the pages its
*predicted* remaining tokens will still need, the request's own current and predicted pages fit and
a watermark of free pages stays untouched. This trades a little batch size for fewer forced
preemptions. `reserve` scales the predicted lengths (0: only current pages, vLLM-like).
Victim choice: preempt the request that loses the least work (fewest tokens to recompute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...paging import pages_for
from ...sequence import InvalidRequestError, Sequence


@dataclass(frozen=True)
class MemoryGuard:
    watermark: float = 0.01  # fraction of all pages kept free
    reserve: float = 1.0  # fraction of predicted remaining tokens to reserve pages for

    def __post_init__(self) -> None:
        if not 0.0 <= self.watermark < 1.0:
            raise InvalidRequestError("watermark", f"must be in [0, 1), got {self.watermark!r}")
        if not self.reserve >= 0.0:
            raise InvalidRequestError("reserve", f"must be >= 0, got {self.reserve!r}")

    def _predicted(self, seq: Sequence) -> float:
        p = seq.predicted_remaining
        return float(seq.max_remaining) if p is None else min(float(p), float(seq.max_remaining))

    def future_pages(self, seq: Sequence, page_size: int) -> int:
        """Pages the sequence will still need beyond what it holds now, by its prediction."""
        n = seq.num_tokens
        extra = math.ceil(self.reserve * self._predicted(seq))
        return pages_for(n + max(extra, 1), page_size) - pages_for(n, page_size)

    def admission_pages(self, seq: Sequence, page_size: int) -> int:
        """Pages to admit the sequence now (its tokens + 1) plus its predicted growth."""
        n = seq.num_tokens
        extra = max(math.ceil(self.reserve * self._predicted(seq)), 1)
        return pages_for(n + extra, page_size)

    def budget(self, running: list[Sequence], free_pages: int, total_pages: int, page_size: int) -> float:
        """Pages available to new admissions after the watermark and the running requests' growth."""
        growth = sum(self.future_pages(s, page_size) for s in running)
        return free_pages - self.watermark * total_pages - growth


def least_work_victim(running: list[Sequence]) -> Sequence:
    """Fewest tokens to recompute; ties: the most recently admitted."""
    return min(running, key=lambda s: (s.num_tokens, -(s.admitted_time or 0.0), -s.arrival_time))
