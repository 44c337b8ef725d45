"""`priority`: user priority (lower value first), then arrival (vLLM's priority policy).

By default it never preempts in `schedule`; with `preempt=True` a waiting request of strictly better
priority preempts the running request of worst priority when the batch is full (as vLLM does).
"""

from __future__ import annotations

from ...sequence import Sequence
from .ranked import RankedPolicy


class PriorityPolicy(RankedPolicy):
    name = "priority"
    counts_down = False

    def __init__(self, *, preempt: bool = False, **kw):
        kw.setdefault("c", float("inf"))
        super().__init__(preempt=preempt, **kw)

    def rank(self, seq: Sequence) -> float:
        return float(seq.priority)
