"""One simulated engine replica: batch slots, KV pages, and steps that jump between events.

The real policy objects decide (same `schedule` / `choose_victim` calls as the engine). What makes a
million requests cheap: every running sequence gains exactly one token per step, so a sequence's
token count is derived from the replica's step counter (`SimSequence`, nothing is touched per step),
and a run of decode steps of a fixed batch is priced in closed form (`StepModel.decode_run_time`).
A run ends at the next event: a completion, a refinement, a page shortage, or an arrival (the
arrival is picked up at the end of the step during which it arrives, as in an engine loop).

Step semantics (shared with the engine): a step computes one token for every running sequence; a
newly admitted sequence first prefills its prompt (plus generated tokens after a recompute
preemption) in that same step, which yields its first token; each prefill chunk of up to
`prefill_chunk` tokens is one call, priced by the step model's per-call term. Before a step every
running sequence must hold ceil((tokens + 1) / page_size) pages; if they do not fit,
`choose_victim` preempts. Preemption as the engine's modes (EngineConfig.preemption_mode): recompute
(prefill prompt + generated again on readmission), swap (resume at no cost: the transfer is not
priced) or keep (resume at no cost, the pages held meanwhile; pages short: kept requests' KV goes
first, `kept_victim`'s choice, then preemptions drop KV as recompute does).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from ..brain.predictor import SimPredictor
from ..brain.scheduler.base import Policy, SchedulerState, kept_victim
from ..paging import pages_for
from ..sequence import Sequence, Status
from .step_model import StepModel, TimedStepModel

_WAITING = (Status.WAITING, Status.SWAPPED)


class SimSequence(Sequence):
    """A Sequence whose token counts follow its replica's step counter (no per-token work)."""

    _plen = 0
    _gen0 = 0  # tokens generated when it was last (re)admitted or frozen
    _s0 = 0  # replica step at that moment
    _clock: Any = None  # the replica while running
    _pv: float | None = None  # predicted remaining when last set ...
    _pg = 0  # ... and the generated count at that moment (the estimate counts down from there)
    _epoch = 0  # bumped at every preemption: invalidates heap entries
    _ref_gen = 0  # generated count at the last refinement
    _idx = 0  # index in the trace
    _arrival_estimate = False  # its estimate is the arrival one: the prefill's replaces it (simulate)

    @property
    def num_prompt_tokens(self) -> int:
        return self._plen

    @property
    def num_generated(self) -> int:
        c = self._clock
        return self._gen0 if c is None else self._gen0 + c.steps - self._s0

    @property
    def num_tokens(self) -> int:
        return self._plen + self.num_generated

    @property
    def predicted_remaining(self) -> float | None:  # type: ignore[override]
        if self._pv is None:
            return None
        return max(self._pv - (self.num_generated - self._pg), 0.0)

    @predicted_remaining.setter
    def predicted_remaining(self, v: float | None) -> None:
        self._pv = None if v is None else float(v)
        self._pg = self.num_generated


class SimReplica:
    def __init__(self, policy: Policy, step_model: StepModel | TimedStepModel, num_slots: int, num_pages: int,
                 page_size: int, preemption: str, predictor: SimPredictor | None,
                 on_finish: Callable[[SimSequence], None],
                 max_jump_steps: int | None = None, prefill_chunk: int = 512, finish_lag_steps: int = 0):
        self.policy, self.sm, self.num_slots = policy, step_model, num_slots
        policy.on_preemption_mode(preemption)  # as the engine tells it
        # the engine under async scheduling processes a step's outputs `steps_in_flight` steps after it
        # dispatched it, so a finished request keeps its slot (and its pages) that much longer
        self.finish_lag = finish_lag_steps
        self.num_pages, self.ps = num_pages, page_size
        self.preemption, self.predictor, self._on_finish = preemption, predictor, on_finish
        self.kept: dict[SimSequence, int] = {}  # "keep": preempted requests -> the pages they hold
        self.kept_pages = 0
        aging = getattr(getattr(policy, "aging", None), "rate", 0.0)
        if max_jump_steps is None and aging > 0 and getattr(policy, "preempt", False):
            max_jump_steps = 8  # aged ranks move between events and may trigger a preemption: look often
        self.max_jump = max_jump_steps or (1 << 62)
        self.prefill_chunk = prefill_chunk  # the engine's largest prefill call (tokens)
        self.refine_every = predictor.refine_every if predictor is not None else None
        self.steps, self.time, self.version = 0, 0.0, 0
        self.running: list[SimSequence] = []
        self.offs: list[int] = []  # tokens - steps, per running sequence (constant while it runs)
        self.waiting: list[SimSequence] = []  # arrival order
        self.waiting_tokens = 0.0  # Σ prompt + predicted remaining over waiting (for routing)
        self._fin: list[tuple[int, int, int, SimSequence]] = []
        self._ref: list[tuple[int, int, int, SimSequence]] = []
        self._tick = itertools.count()
        self._prefill: list[tuple[SimSequence, int]] = []  # admitted at this boundary, tokens to prefill
        self._probes: list[int] = []  # prompt tokens of probe-only prefills due in the next step
        self.probe_on_arrival = (policy.probe_on_arrival and policy.arrival_estimate == "probe"
                                 and predictor is not None)
        # the policy's probe_hold_s (step_scheduler.py): probes wait for a step that prefills anyway
        self.probe_hold_s = policy.probe_hold_s
        self._unprobed: list[SimSequence] = []
        self._unprobed_since: float | None = None
        self.planned: tuple | None = None  # ("wake",) or (t0, steps, n, kv0)
        self.preemptions = 0
        # finished requests' output tokens: the mean is the slot forecast's prior, as in the engine
        self.finished_tokens = self.finished_count = 0
        self._changed = False  # state changed at this boundary: the engine would re-schedule next step
        # Optional per-run records for brain/capacity.py: (end time, seconds, steps, running, waiting, tokens
        # out); a run of m steps of a fixed batch of n is one record (n x m tokens). None: off.
        self.step_log: list[tuple[float, float, int, int, int, int]] | None = None
        self._plan_waiting = 0

    # --- resources -------------------------------------------------------------------------------------
    def used_at(self, step: int) -> int:
        """Pages held once the running sequences have `step - steps` more tokens (kept ones' included)."""
        if not self.offs:
            return self.kept_pages
        a = np.asarray(self.offs) + (step + self.ps - 1)
        return int((a // self.ps).sum()) + self.kept_pages

    def fits(self, step: int) -> bool:
        """used_at(step) <= num_pages, with a cheap upper bound first (ceil adds < 1 page each)."""
        n = len(self.offs)
        if (sum(self.offs) + n * step) // self.ps + n + self.kept_pages <= self.num_pages:
            return True
        return self.used_at(step) <= self.num_pages

    def _drop_kept(self, s: SimSequence) -> int:
        """A kept request loses its pages (returned): it recomputes when admitted again."""
        n = self.kept.pop(s)
        self.kept_pages -= n
        s.status = Status.WAITING
        return n

    def _free_kept(self, need: int, spare: SimSequence) -> int:
        """Drop kept requests' pages (`kept_victim` first, not `spare`'s) until `need` are freed: the
        pages freed, 0 if all of them would not be enough (StepScheduler._drop_kept)."""
        others = [k for k in self.kept if k is not spare]
        if sum(self.kept[k] for k in others) < need:
            return 0
        freed = 0
        while freed < need:
            v = kept_victim(others)
            others.remove(v)
            freed += self._drop_kept(v)
        return freed

    def outstanding_tokens(self) -> float:
        run = sum(s._plen + (s.predicted_remaining or 0.0) for s in self.running)
        return self.waiting_tokens + run

    # --- state changes -----------------------------------------------------------------------------
    def _wtok(self, s: SimSequence) -> float:
        return s._plen + (s._pv if s._pv is not None else 0.0)

    def arrive(self, s: SimSequence, t: float) -> None:
        # The engine's probe-only prefill (engine._probe_waiting): a request that must wait for a slot
        # is predicted from its prompt at once, for one prefill call in the next step.
        if (self.probe_on_arrival and s._pv is None and s._plen <= self.prefill_chunk
                and len(self.waiting) + 1 > self.num_slots - len(self.running)):
            if self.probe_hold_s > 0:
                self._unprobed.append(s)
                if self._unprobed_since is None:
                    self._unprobed_since = t
            else:
                self.predictor.sim_prefill(s)
                self._probes.append(s._plen)
        self.waiting.append(s)
        self.waiting_tokens += self._wtok(s)
        self.policy.on_arrival(s, t)

    def _admit(self, s: SimSequence, t: float) -> int:
        self.waiting.remove(s)
        self.waiting_tokens -= self._wtok(s)
        if s.first_admitted_time is None:
            s.first_admitted_time = t
            tokens = s._plen
        else:
            tokens = 0 if s.status is Status.SWAPPED else s._plen + s._gen0
        if s in self.kept:  # its pages count as the running ones' again
            self.kept_pages -= self.kept.pop(s)
        s.status, s.admitted_time = Status.RUNNING, t
        s._clock, s._s0 = self, self.steps
        self._changed = True
        self.running.append(s)
        self.offs.append(s._plen + s._gen0 - self.steps)
        self._prefill.append((s, tokens))
        # forced length: ends at this step, and is freed finish_lag steps later
        fin = self.steps + s.oracle_remaining_at_start - s._gen0 + self.finish_lag
        heapq.heappush(self._fin, (fin, next(self._tick), s._epoch, s))
        if self.refine_every:
            due = max(self.refine_every - (s._gen0 - s._ref_gen), 1)
            heapq.heappush(self._ref, (self.steps + due, next(self._tick), s._epoch, s))
        return tokens

    def _remove(self, s: SimSequence) -> None:
        i = self.running.index(s)
        del self.running[i]
        del self.offs[i]
        pv = s.predicted_remaining  # freeze the lazily derived counts
        s._gen0 = s.num_generated
        s._clock = None
        if pv is not None:
            s._pv, s._pg = pv, s._gen0
        s._epoch += 1

    def preempt(self, s: SimSequence, t: float, for_pages: bool = False) -> None:
        self._remove(s)
        keep = self.preemption == "keep" and not for_pages
        s.status = Status.SWAPPED if self.preemption == "swap" or keep else Status.WAITING
        if keep:
            self.kept[s] = pages_for(s.num_tokens, self.ps)
            self.kept_pages += self.kept[s]
        s.num_preemptions += 1
        self.preemptions += 1
        self._changed = True
        bisect.insort(self.waiting, s, key=lambda x: x.arrival_time)
        self.waiting_tokens += self._wtok(s)

    def _finish(self, s: SimSequence, t: float) -> None:
        self._remove(s)
        s.status, s.finish_time = Status.FINISHED, t
        self.finished_tokens += s.num_generated
        self.finished_count += 1
        self.policy.on_finish(s, t)
        self._on_finish(s)

    def _valid_top(self, heap: list) -> tuple | None:
        while heap:
            top = heap[0]
            if top[3]._epoch == top[2] and top[3].status is Status.RUNNING:
                return top
            heapq.heappop(heap)
        return None

    # --- the loop ------------------------------------------------------------------------------------
    def end_jump(self, t: float) -> None:
        """The planned run of steps ended at time t."""
        p = self.planned
        if p is not None and p[0] != "wake":
            self.steps += p[1]
            if self.step_log is not None:
                self.step_log.append((t, t - p[0], p[1], p[2], self._plan_waiting, p[1] * p[2]))
            for s, _ in self._prefill:
                if s.first_token_time is None:
                    s.first_token_time = t
            self._prefill.clear()
        self.time, self.planned = t, None

    def boundary(self, t: float) -> None:
        while (top := self._valid_top(self._fin)) is not None and top[0] <= self.steps:
            self._finish(top[3], t)
        while (top := self._valid_top(self._ref)) is not None and top[0] <= self.steps:
            heapq.heappop(self._ref)
            s = top[3]
            d = s.num_generated - s._ref_gen
            if d > 0:
                self.predictor.sim_refine(s, d)
                s._ref_gen = s.num_generated
            heapq.heappush(self._ref, (self.steps + self.refine_every, next(self._tick), s._epoch, s))
        if self.waiting:
            self._schedule(t)
        while self.running and not self.fits(self.steps + 1):
            if self.kept:
                self._drop_kept(kept_victim(list(self.kept)))
            else:
                self.preempt(self.policy.choose_victim(self.running, t), t, for_pages=True)

    def _schedule(self, t: float) -> None:
        free_pages = self.num_pages - self.used_at(self.steps)
        st = SchedulerState(self.waiting, self.running, self.num_slots - len(self.running), free_pages,
                            self.num_pages, self.ps, t, step=self.steps)
        dec = self.policy.schedule(st)
        for v in dec.preempt:
            if v.status is Status.RUNNING:
                self.preempt(v, t)
        if dec.preempt:
            free_pages = self.num_pages - self.used_at(self.steps)
        for w in dec.admit:
            if w.status not in _WAITING:
                continue  # stale or duplicate entry from the policy
            need = pages_for(w._plen + w._gen0 + 1, self.ps) - self.kept.get(w, 0)
            if len(self.running) >= self.num_slots:
                break
            if need > free_pages:  # the engine's _admit: kept requests' pages first, if they are enough
                free_pages += self._free_kept(need - free_pages, spare=w)
            if need > free_pages:
                break  # keep the policy's order: nothing jumps a request that does not fit yet
            self._admit(w, t)
            free_pages -= need

    def plan(self) -> float | None:
        """Plan the next run of steps; returns its end time (None: idle)."""
        n = len(self.running)
        if n == 0:
            self._prefill.clear()
            self._probes.clear()
            self._unprobed.clear()  # nothing runs: whoever waits is admitted and predicted at its prefill
            self._unprobed_since = None
            self._changed = False
            return None
        kv0 = sum(self.offs) + n * self.steps
        self._plan_waiting = len(self.waiting)
        if self._unprobed and (any(tok > 0 for _, tok in self._prefill)
                               or self.time - self._unprobed_since >= self.probe_hold_s):
            for s in self._unprobed:  # they join this step's prefill call
                if s.status is Status.WAITING and s._pv is None:
                    self.predictor.sim_prefill(s)
                    self.policy.on_estimate(s)
                    self._probes.append(s._plen)
            self._unprobed.clear()
            self._unprobed_since = None
        if any(tok > 0 for _, tok in self._prefill) or self._probes:
            self._changed = False
            bt = n - len(self._prefill) + sum(max(tok, 1) for _, tok in self._prefill) + sum(self._probes)
            self._probes.clear()
            self.planned = (self.time, 1, n, kv0)
            # the engine packs the step's chunks (probe-only prefills included) into one prefill call
            return self.time + self._model(self.time).step_time(bt, kv0, 1)
        # after a change, one step: the engine's next `schedule` call sees the new state; after that
        # nothing the policy looks at improves until the next event, so its answer cannot change
        m = 1 if self._changed else self.max_jump
        self._changed = False
        fin = self._valid_top(self._fin)
        if fin is not None:
            m = min(m, fin[0] - self.steps)
        if self.refine_every and (ref := self._valid_top(self._ref)) is not None:
            m = min(m, ref[0] - self.steps)
        if self._unprobed:  # re-plan when the oldest unprobed request's hold runs out
            m = min(m, self._model(self.time).steps_until(n, kv0, self._unprobed_since + self.probe_hold_s
                                                          - self.time))
        m = max(m, 1)
        if not self.fits(self.steps + m):  # largest run that fits (>= 1 step)
            lo, hi = 1, m
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.fits(self.steps + mid) else (lo, mid)
            m = lo
        self.planned = (self.time, m, n, kv0)
        return self.time + self._model(self.time).decode_run_time(n, kv0, m)

    def _model(self, t: float) -> StepModel:
        """The step model in force at time t (a TimedStepModel: the run's speed then)."""
        return self.sm.at(t) if isinstance(self.sm, TimedStepModel) else self.sm

    def truncate(self, ta: float) -> float | None:
        """An arrival at ta: end the current run after the step in progress; new end time if earlier."""
        p = self.planned
        if p is None or p[0] == "wake" or p[1] <= 1:
            return None
        t0, m_plan, n, kv0 = p
        m = self._model(t0).steps_until(n, kv0, ta - t0)
        if m >= m_plan:
            return None
        self.planned = (t0, m, n, kv0)
        return t0 + self._model(t0).decode_run_time(n, kv0, m)
