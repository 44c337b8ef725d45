"""Shared machinery of the rank-ordered policies (priority, srpt-oracle, trail, gittins).

Each policy defines `rank(seq)` (lower runs first; in tokens for the length-aware ones). This class
turns a rank into a full policy:
- waiting queue ordered by (rank aged by waiting time, arrival time, request id) (`order="rank"`,
  aging linear or multiplicative: aging.py), or by response ratio (`order="hrrn"`: hrrn.py), or by
  rank with a starvation guard in front (`order="guard"`: starvation.py), or by a deadline set from
  the rank's quantile and the recent mean E2E (`order="deadline"`: deadline.py);
- admission into free slots in that order, optionally memory-aware (memory.py);
- limited preemption (TRAIL): when the batch is full, the best waiting request may preempt the
  running request with the largest rank among those still preemptible (generated <= c x initial
  prediction; c = inf: always, c = 0: never), only if that rank exceeds the waiting one's by more
  than `margin`; requests past the cutoff are never preempted;
- a cap on preemptions per request (`max_preemptions`; None: no cap): a request preempted that many
  times (by the policy or for memory) is never again chosen by `schedule`, which bounds thrash;
- cost-aware preemption (`preempt_cost`, preemption_cost.py): a pair passes only when the SRPT
  exchange saving (R_victim - R_waiting) x decode-step time exceeds the victim's recompute time x the
  requests in the system; among the preemptible running requests ranked above the waiting one, the
  one with the largest net saving is taken;
- victim choice when memory runs out: "recent" (vLLM), "least_work" or "longest";
- preemption-rate reporting (`stats`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from ...sequence import InvalidRequestError, Sequence
from .aging import Aging
from .base import Decision, Policy, PolicyStats, SchedulerState
from .deadline import DeadlineOrder
from .hrrn import hrrn_key
from .memory import MemoryGuard, least_work_victim
from .preemption_cost import RecomputeCost
from .runindex import RunIndex
from .starvation import StarvationGuard
from .waitqueue import WaitIndex

VICTIM_RULES = ("recent", "least_work", "longest")
ORDERS = ("rank", "hrrn", "guard", "deadline")



class RankedPolicy(Policy):
    name = "ranked"
    counts_down = True  # rank falls one per generated token (lengths); False: fixed (priority)

    def __init__(self, *, c: float = math.inf, margin: float = 0.0, aging: float = 0.0,
                 memory: MemoryGuard | None = None, victim: str = "recent", unknown_rank: float = 0.0,
                 preempt: bool = True, max_preemptions: int | None = None,
                 preempt_cost: Any = None, aging_form: str = "linear", order: str = "rank",
                 guard: float = 2.0, deadline: float = 2.0):
        if not c >= 0:
            raise InvalidRequestError("c", f"must be >= 0, got {c!r}")
        if not margin >= 0:
            raise InvalidRequestError("margin", f"must be >= 0, got {margin!r}")
        if max_preemptions is not None and not (isinstance(max_preemptions, int) and max_preemptions >= 0):
            raise InvalidRequestError("max_preemptions",
                                      f"must be None or an int >= 0, got {max_preemptions!r}")
        if victim not in VICTIM_RULES:
            raise InvalidRequestError("victim", f"must be one of {VICTIM_RULES}, got {victim!r}")
        if order not in ORDERS:
            raise InvalidRequestError("order", f"must be one of {ORDERS}, got {order!r}")
        self.c, self.margin, self.victim, self.order = float(c), float(margin), victim, order
        self.aging = Aging(float(aging), aging_form)
        self.guard = StarvationGuard(float(guard)) if order == "guard" else None
        self.deadline = DeadlineOrder(float(deadline)) if order == "deadline" else None
        self.memory = memory
        self.unknown_rank = float(unknown_rank)
        self.max_preemptions = max_preemptions
        self._preempt_asked = preempt
        self.preempt = preempt and self.c > 0 and max_preemptions != 0
        self.cost = RecomputeCost.coerce(preempt_cost)
        self.stats = PolicyStats()
        self._index = WaitIndex(self._key)
        self._run = RunIndex(self.rank, self.preemptible, self.counts_down)

    # --- ranks ---------------------------------------------------------------------------------------
    def rank(self, seq: Sequence) -> float:
        """Lower runs first. Must not change while the sequence waits."""
        p = seq.predicted_remaining
        return self.unknown_rank if p is None else float(p)

    def _key(self, seq: Sequence) -> tuple:
        if self.deadline is not None:
            known = seq.predicted_remaining is not None or not self.probe_on_arrival
            return (self.deadline.key(seq, self.rank(seq) if known else None), seq.arrival_time,
                    seq.request_id)
        return (self.aging.static_key(self.rank(seq), seq.arrival_time), seq.arrival_time, seq.request_id)

    def preemptible(self, seq: Sequence) -> bool:
        if not self.preempt:
            return False
        if self.max_preemptions is not None and seq.num_preemptions >= self.max_preemptions:
            return False  # permanent: the count never falls (the run index relies on that)
        if self.c == math.inf:
            return True
        init = seq.initial_prediction
        return init is not None and seq.num_generated <= self.c * init

    # --- the interface -------------------------------------------------------------------------------
    def schedule(self, state: SchedulerState) -> Decision:
        self.stats.schedule_calls += 1
        ordered = self._ordered(state.waiting, state.now)
        admit: list[Sequence] = []
        free = state.free_slots
        gate = self.memory.gate(state) if self.memory is not None and state.waiting else None
        nxt = None
        for w in ordered:
            if free <= 0:
                nxt = w
                break
            # keep the order: nothing jumps a request that does not fit yet (alone, it always fits)
            if gate is not None and not gate.admit(w, force=not (state.running or admit)):
                break
            admit.append(w)
            free -= 1
        preempt: list[Sequence] = []
        if nxt is not None and self.preempt and state.running:
            preempt = self._preemptions(nxt, ordered, state, admit)
        ordered.close()
        self._index.watch(admit)
        self._index.watch(preempt)
        self.stats.admissions_proposed += len(admit)
        self.stats.preemptions += len(preempt)
        return Decision(preempt=preempt, admit=admit)

    def _ordered(self, waiting: list[Sequence], now: float) -> Iterator[Sequence]:
        if self.order == "hrrn":  # time-varying keys: a sort per call (hrrn.py)
            yield from sorted(waiting, key=lambda s: hrrn_key(self.rank(s), s, now))
            return
        it = self._index.ordered(waiting)
        try:
            if self.guard is None:
                yield from it
                return
            first = self.guard.starving(waiting, now)
            yield from first
            skip = set(first)
            yield from (s for s in it if s not in skip)
        finally:
            it.close()  # puts the consumed heap entries back

    def _preemptions(self, first: Sequence, rest, state: SchedulerState,
                     admit: list[Sequence]) -> list[Sequence]:
        # pairs (best waiting, largest-rank preemptible running) while the waiting one beats it;
        # waiting ranks only get worse down the queue, so one failed comparison ends the search
        if self.probe_on_arrival and first.predicted_remaining is None:
            return []  # it beats no one (_beats), so the search ends at once: skip building the victims
        if state.step is None:  # the engine: a sort of the (short) running list
            cands = [r for r in state.running if self.preemptible(r)]
            key = lambda r: (-self.rank(r), -r.arrival_time, r.request_id)  # noqa: E731
            if not cands or not self._beats(first, min(cands, key=key), state.now):
                return []  # the largest-rank victim is not beaten: most steps end here, unsorted
            victims = iter(sorted(cands, key=key))
        else:  # the simulator: incremental (runindex.py)
            victims = self._run.ordered(state.running, state.step)
        try:
            if self.cost is None:
                return self._pair_by_rank(first, rest, victims, state.now, admit)
            return self._pair_by_cost(first, rest, victims, state, admit)
        finally:
            getattr(victims, "close", lambda: None)()

    def _pair_by_rank(self, w: Sequence | None, rest, victims, now: float,
                      admit: list[Sequence]) -> list[Sequence]:
        out: list[Sequence] = []
        for r in victims:
            if w is None or not self._beats(w, r, now):
                break
            out.append(r)
            admit.append(w)
            w = next(rest, None)
        return out

    def _pair_by_cost(self, w: Sequence | None, rest, victims, state: SchedulerState,
                      admit: list[Sequence]) -> list[Sequence]:
        # Candidates are pulled from the (largest rank first) victims while they still beat the
        # current waiting request by rank; each waiting request takes the candidate with the largest
        # positive net saving. A later waiting request has a larger rank, so a smaller saving against
        # every candidate: the first one that finds none ends the search.
        assert self.cost is not None
        tau: float | None = None  # one decode step's time: a sum over the batch, only when a pair is priced
        in_system = len(state.running) + len(state.waiting)
        pool: list[Sequence] = []
        out: list[Sequence] = []
        it = iter(victims)
        pending: Sequence | None = next(it, None)
        while w is not None:
            while pending is not None and self._beats(w, pending, state.now):
                pool.append(pending)
                pending = next(it, None)
            rw = self.rank(w)
            best, best_gain = None, 0.0
            for r in pool:
                if not self._beats(w, r, state.now):
                    continue
                if tau is None:
                    tau = self.cost.step_time(state.running)
                g = self.cost.net_gain(self.rank(r), rw, r, tau, in_system)
                if g > best_gain:
                    best, best_gain = r, g
            if best is None:
                break
            pool.remove(best)
            out.append(best)
            admit.append(w)
            w = next(rest, None)
        return out

    def _beats(self, waiting: Sequence, running: Sequence, now: float) -> bool:
        """Whether `waiting` may take `running`'s slot: strictly better by > margin. Both sides are
        aged alike: comparing an aged waiter with a raw runner lets a preempted request, which keeps
        its age credit, preempt straight back (thrash)."""
        if self.probe_on_arrival and waiting.predicted_remaining is None:
            return False  # unknown length (not probed yet): preempting to learn it thrashes
        aged_waiting = self.aging.effective(self.rank(waiting), waiting.arrival_time, now)
        aged_running = self.aging.effective(self.rank(running), running.arrival_time, now)
        return aged_running > aged_waiting + self.margin

    def choose_victim(self, running: list[Sequence], now: float) -> Sequence:
        if self.victim == "least_work":
            v = least_work_victim(running)
        elif self.victim == "longest":
            pool = [r for r in running if self.preemptible(r)] or running
            v = max(pool, key=lambda s: (self.rank(s), s.arrival_time))
        else:
            v = super().choose_victim(running, now)
        self.stats.victims += 1
        self._index.watch([v])
        return v

    def on_arrival(self, seq: Sequence, now: float) -> None:
        self._index.add(seq)

    def on_estimate(self, seq: Sequence) -> None:
        # its rank moved from unknown_rank to the estimate: re-file it (the index re-files a stale key
        # only when it surfaces, which is too late when the stale key ranks worse than the fresh one)
        self._index.add(seq)

    def on_finish(self, seq: Sequence, now: float) -> None:
        if self.guard is not None:
            self.guard.on_finish(seq, now)
        if self.deadline is not None:
            self.deadline.on_finish(seq, now)
        self._index.discard(seq)
        self._run.forget(seq)
