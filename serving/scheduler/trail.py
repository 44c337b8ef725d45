"""`trail`: SRPT on predicted remaining length with limited preemption (Shahout et al., ICLR 2025).

Waiting queue ordered by predicted remaining length (ties: arrival). When the batch is full the best
waiting request may preempt the running request with the largest predicted remaining length among
those still preemptible: generated <= c x initial prediction (paper: c = 0.8; c = 0: never) and only
if its prediction exceeds the waiting one's by more than `margin` tokens. Past the cutoff a request is
never preempted (it has sunk too much work to be worth restarting). A request not yet predicted
(the engine predicts at prefill) ranks as `unknown_rank` (default 0: prefill it first to learn it).
"""

from __future__ import annotations

from typing import Any

from .ranked import RankedPolicy


class TrailPolicy(RankedPolicy):
    name = "trail"
    probe_on_arrival = True

    def __init__(self, *, c: float = 0.8, margin: float = 0.0, victim: str = "longest", **kw: Any):
        super().__init__(c=c, margin=margin, victim=victim, **kw)
