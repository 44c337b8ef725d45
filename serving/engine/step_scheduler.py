"""The engine's first beat: decide what runs this step and describe it as one `StepBatch`.

Owns the request queues, the batch slots and the page allocator. Each step: the policy's decision
(preempt, then admit in its order while slots and pages allow), then decode rows (each running,
prefilled request gets pages for this call's tokens; when none are free the policy names a victim),
then prefill chunks of admitted requests in admission order under the token budget, then probe-only
prefills of waiting requests with the budget left.

Probe-only prefills: a length-aware policy ranks waiting requests by the probe's prediction, which a
request gets at its prefill. A request that waits has had none, so a policy could only rank it blind
or preempt a running request to learn it (measured on the H200: 4 preemptions per request). So each
waiting request gets one probe-only prefill: its prompt runs into pages borrowed for the step and
returned right after the runner's call (the sampled token and the KV are dropped; the real prefill on
admission gives the same probe output). Its prediction ranks it from the next step on. Prompts
longer than the budget left, or with no pages free, stay unknown (and never preempt). A step that
prefills costs more than a decode-only one while further chunks in it cost little (H200: ~2 ms with a
prefill call of its own; ~1 ms since prefill chunks ride in the decode rows' forward, mixed steps), so
a policy's `probe_hold_s` lets the probes wait that long for a step that prefills anyway.
A policy with `arrival_estimate="host"` gets none: the engine gives each request a prompt estimator's estimate
when it arrives (LLMEngine.add_request).

Async scheduling (EngineConfig.async_scheduling): this step is scheduled while the one before still
runs, its results not yet on the host. A decode row counts the tokens in flight (`ahead`) as
produced: its positions, pages and length limits include them (a stop among them is found one step
late: that row's tokens are then dropped). Whatever needs a result still in flight waits one step:
a request with work in flight is not admitted (its tokens are not all known) nor probed again, and
with a probe a prompt's next chunk waits for the prompt-tap sum of the one before. Decode rows'
KV progress and `prefilled` are set here, when the work is scheduled, in both modes.
"""

from __future__ import annotations

import bisect
import time
from operator import attrgetter

from ..brain.scheduler.base import Policy, SchedulerState, kept_victim
from ..sequence import Sequence, Status
from .batch import DecodeRow, PrefillChunk, StepBatch, padded_tokens, prefill_layout
from .block_manager import BlockManager
from .request_state import EngineRequest
from .runner import Runner

_ARRIVAL = attrgetter("arrival_time")


class StepScheduler:
    def __init__(self, config, policy: Policy, runner: Runner, reqs: dict[str, EngineRequest],
                 probe_waiting: bool):
        self.config, self.policy, self.runner, self.reqs = config, policy, runner, reqs
        # a policy whose first estimate comes from the host's prompt estimator needs no probe-only prefills
        self.probe_waiting = probe_waiting and policy.probe_on_arrival and policy.arrival_estimate == "probe"
        self.blocks = BlockManager(config.num_pages, config.page_size)
        self.row = prefill_layout(config.prefill_buckets, config.max_prefill_tokens_per_step)[0]
        self.waiting: list[Sequence] = []  # waiting + swapped
        self.running: list[Sequence] = []  # admission order
        self.free_slots = list(range(config.num_slots - 1, -1, -1))
        self.num_preemptions = 0
        self.probe_calls = self.probe_tokens = 0  # probe-only prefills (requests, prompt tokens)
        self._unknown_since: float | None = None  # when a waiting request last went unprobed (probe_hold_s)

    def schedule(self, now: float) -> StepBatch:
        decision = self.policy.schedule(self.state(now))
        for seq in decision.preempt:
            if seq.status is Status.RUNNING:
                self.preempt(seq)
        for seq in decision.admit:
            if not self._admit(seq, now):
                break  # keep the policy's order: nothing jumps a request that does not fit yet
        decodes = self._decode_rows()
        prefills, budget = self._prefill_chunks(self.config.max_prefill_tokens_per_step)
        if self.probe_waiting:
            prefills += self._probe_chunks(budget, now, rides=bool(prefills))
        return StepBatch(prefills=prefills, decodes=decodes)

    def enqueue(self, seq: Sequence) -> None:
        """Into the waiting list, kept in arrival order (a per-step sort of hundreds of waiting requests
        cost a tenth of a millisecond of host time per step)."""
        bisect.insort(self.waiting, seq, key=_ARRIVAL)

    def state(self, now: float) -> SchedulerState:
        return SchedulerState(waiting=list(self.waiting), running=list(self.running),
                              free_slots=len(self.free_slots), free_pages=self.blocks.num_free,
                              total_pages=self.blocks.num_usable, page_size=self.config.page_size, now=now)

    def _admit(self, seq: Sequence, now: float) -> bool:
        if seq not in self.waiting:
            return True  # stale entry from the policy: skip it, keep going
        st = self.reqs[seq.request_id]
        if st.in_flight:  # async: a call in flight still has its tokens or its probe output: a later
            return True  # step (skipped, not blocking: new arrivals are probed in flight every step)
        # Pages for every token so far (a request swapped mid-prefill still has chunks to write); a
        # request preempted under "keep" holds its own and may need one more.
        need = max(self.blocks.pages_for(seq.num_tokens) - len(seq.block_table), 0)
        if not self.free_slots:
            return False
        if not self.blocks.can_allocate(need) and not self._drop_kept(need, spare=seq):
            return False
        self.waiting.remove(seq)
        pages = self.blocks.allocate(seq, need)
        if st.swapped is not None:
            self.runner.swap_in(pages[:st.swapped.num_pages], st.swapped)
            st.swapped = None
        seq.slot = self.free_slots.pop()
        seq.status = Status.RUNNING
        seq.admitted_time = now
        if seq.first_admitted_time is None:
            seq.first_admitted_time = now
        self.running.append(seq)
        return True

    def preempt(self, seq: Sequence, for_pages: bool = False) -> None:
        """Running -> waiting (recompute: drop the KV) or swapped (swap: KV to host memory; keep: KV
        left in its pages, only the slot freed, unless the preemption is `for_pages`)."""
        if seq.status is not Status.RUNNING:
            raise ValueError(f"{seq.request_id!r} is not running")
        st = self.reqs[seq.request_id]
        mode = self.config.preemption_mode
        keep_pages = mode == "keep" and not for_pages
        if keep_pages:
            seq.status = Status.SWAPPED  # its tokens in flight still write its own pages
        elif mode == "swap":
            keep = self.blocks.pages_for(seq.num_computed_tokens)
            st.swapped = self.runner.swap_out(seq.block_table[:keep])
            seq.status = Status.SWAPPED
        else:
            self._drop_kv(seq)
        if not keep_pages:
            self.blocks.free(seq)
        self.release_slot(seq)
        self.enqueue(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def _drop_kv(self, seq: Sequence) -> None:
        """Recompute from the start when admitted again (the caller frees the pages)."""
        st = self.reqs[seq.request_id]
        seq.num_computed_tokens = 0
        st.prefilled, st.tap = False, None
        seq.status = Status.WAITING

    def _drop_kept(self, need: int, spare: Sequence | None = None) -> bool:
        """Free pages held by requests preempted under "keep" (`kept_victim` first) until `need` pages
        are free; those requests recompute when admitted again. False if that is not enough (nothing
        dropped)."""
        kept = [s for s in self.waiting if s.status is Status.SWAPPED and s.block_table and s is not spare]
        if self.blocks.num_free + sum(len(s.block_table) for s in kept) < need:
            return False
        while not self.blocks.can_allocate(need):
            victim = kept_victim(kept)
            kept.remove(victim)
            self._drop_kv(victim)
            self.blocks.free(victim)
        return True

    def release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or cancelled request: its slot and pages come back now."""
        self.blocks.free(seq)
        self.release_slot(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _decode_rows(self) -> list[DecodeRow]:
        # runs for every running request on every step (the host path that bounds a small model's
        # step at large batches): locals and list lengths instead of property calls
        reqs, blocks, per_call = self.reqs, self.blocks, self.config.decode_steps_per_call
        rows: list[tuple[DecodeRow, EngineRequest]] = []
        preempted = False
        running = Status.RUNNING
        for seq in list(self.running):
            st = reqs[seq.request_id]
            if seq.status is not running or not st.prefilled:
                continue  # preempted as a victim earlier in this loop, or still prefilling
            # async: `ahead` tokens are still in flight (assumed produced; a stop among them is
            # found late and this row's tokens are then dropped)
            ahead, stop = st.ahead, st.stop
            generated = len(seq.output_ids) + ahead
            num_tokens = len(seq.prompt_ids) + generated
            # at most up to the request's length limit (max_tokens, the context, a replayed answer's end)
            n = min(per_call, stop.max_generated - generated)
            if stop.forced_len:
                n = min(n, stop.forced_len - generated)
            if n <= 0:
                continue  # async: the tokens in flight reach its length limit; it finishes on arrival
            # KV for positions up to num_tokens - 1 + n - 1 is written by this call.
            while not blocks.ensure_capacity(seq, num_tokens + n - 1):
                if self._drop_kept(blocks.pages_for(num_tokens + n - 1) - len(seq.block_table)):
                    continue  # kept requests' pages were enough
                victim = self.policy.choose_victim(self.running, time.monotonic())
                self.preempt(victim, for_pages=True)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                rows.append((DecodeRow(seq, n, ahead=ahead), st))
        if preempted:  # victims of a later row's pages do not run
            rows = [(r, st) for r, st in rows if r.seq.status is Status.RUNNING]
        for r, st in rows:  # the call writes KV for n more positions and samples n tokens
            r.seq.num_computed_tokens += r.steps
            st.ahead += r.steps
            st.in_flight += 1
        return [r for r, _ in rows]

    def _prefill_chunks(self, budget: int) -> tuple[list[PrefillChunk], int]:
        """Chunks of requests still prefilling, in admission order, under the token budget (counted
        in the packed call's whole rows, so every chunk of the step fits one call)."""
        row, chunks = self.row, []
        for seq in self.running:
            st = self.reqs[seq.request_id]
            if st.prefilled or (st.in_flight and self.runner.has_probe):
                continue  # decoding, or (async) its previous chunk's prompt-tap sum is in flight
            start = seq.num_computed_tokens
            n = min(seq.num_tokens - start, budget)
            if padded_tokens(n, row) > budget:
                n = budget // row * row
            if n <= 0:
                break
            ch = PrefillChunk(seq, start, seq.all_ids[start:start + n], tap=st.tap)
            chunks.append(ch)
            seq.num_computed_tokens += n
            budget -= padded_tokens(n, row)
            st.in_flight += 1
            if ch.completes:  # it decodes from the next step on (async: fed this call's token)
                st.prefilled, st.tap = True, None
                st.ahead += 1
        return chunks, budget

    def _probe_chunks(self, budget: int, now: float, rides: bool) -> list[PrefillChunk]:
        """Probe-only prefills of waiting requests not yet predicted. With the policy's `probe_hold_s`
        they wait for a step that already prefills (`rides`: one device call either way) unless the
        oldest has waited that long."""
        unknown = [s for s in self.waiting  # in arrival order (async: not those probed in flight)
                   if s.predicted_remaining is None and not s.num_generated and s.status is Status.WAITING
                   and not self.reqs[s.request_id].in_flight]
        if not unknown:
            self._unknown_since = None
            return []
        if self._unknown_since is None:
            self._unknown_since = now
        if not rides and now - self._unknown_since < self.policy.probe_hold_s:
            return []
        self._unknown_since = None
        chunks = []
        for seq in unknown:
            n = seq.num_prompt_tokens
            if padded_tokens(n, self.row) > budget:
                continue
            need = self.blocks.pages_for(n)
            if not self.blocks.can_allocate(need):
                break
            self.blocks.allocate(seq, need)  # borrowed: `return_borrowed` frees them after the call
            self.reqs[seq.request_id].in_flight += 1
            chunks.append(PrefillChunk(seq, 0, list(seq.prompt_ids), probe_only=True))
            budget -= padded_tokens(n, self.row)
            self.probe_calls += 1
            self.probe_tokens += n
        return chunks

    def return_borrowed(self, batch: StepBatch) -> None:
        """Free the probe-only prefills' pages (the device call that writes them is already queued,
        so any later use of the pages is ordered after it)."""
        for ch in batch.prefills:
            if ch.probe_only:
                self.blocks.free(ch.seq)
