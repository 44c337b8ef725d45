"""`srpt-oracle`: shortest remaining processing time with the exact remaining lengths (TRAIL+).

The upper bound on what length prediction can give. Fully preemptive by default (c = inf, margin 0:
a waiting request preempts the running one with the longest remaining length when strictly shorter).
"""

from __future__ import annotations

from ...sequence import InvalidRequestError, Sequence
from .ranked import RankedPolicy


class SRPTOraclePolicy(RankedPolicy):
    name = "srpt-oracle"

    def rank(self, seq: Sequence) -> float:
        r = seq.oracle_remaining
        if r is None:
            raise InvalidRequestError("oracle_remaining_at_start", f"srpt-oracle needs it ({seq.request_id})")
        return float(r)

    def preemptible(self, seq: Sequence) -> bool:
        if (self.preempt and self.c != float("inf") and seq.initial_prediction is None
                and (self.max_preemptions is None or seq.num_preemptions < self.max_preemptions)):
            return seq.num_generated <= self.c * (seq.oracle_remaining_at_start or 0)
        return super().preemptible(seq)
