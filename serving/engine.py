"""LLMEngine: continuous batching over fixed slots with a paged KV cache.

One `step()` reads top to bottom:
    schedule (policy) -> preempt -> admit -> prefill chunks (token budget) -> decode (all slots,
    `decode_steps_per_call` tokens) -> postprocess (append, stop checks, detokenize, finish, free)
    -> RequestOutputs.
The decode call is dispatched before the prefill results are post-processed, so that host work runs
while the device computes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from ..models.llama import Llama
from ..models.probe import ProbeHead
from . import swap
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, Tokenizer
from .engine_api import EngineStats
from .model_runner import ModelRunner, SamplingRows
from .router import FORECAST_PRIOR_TOKENS, replica_forecast
from .scheduler.base import Policy, SchedulerState
from .sequence import (
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    Sequence,
    Status,
    check_priority,
)


@dataclass
class EngineConfig:
    num_slots: int = 8
    page_size: int = 16
    num_pages: int = 512
    max_model_len: int = 2048
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    max_prefill_tokens_per_step: int = 512
    decode_steps_per_call: int = 1
    preemption_mode: str = "recompute"  # or "swap"
    policy: str | Policy = "fcfs"
    dtype: Any = None  # KV cache dtype; None = the model's compute dtype
    kernel_impl: str = "auto"
    max_queue: int = 4096
    seed: int = 0  # seeds requests that give none
    tensor_parallel: int = 1  # [issue 8] shard weights + KV pages over this many local devices

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if min(self.num_slots, self.page_size, self.decode_steps_per_call, self.max_queue) < 1:
            raise ValueError("num_slots, page_size, decode_steps_per_call and max_queue must be >= 1")
        if not self.prefill_buckets or list(self.prefill_buckets) != sorted(set(self.prefill_buckets)):
            raise ValueError(f"prefill_buckets must be increasing, got {self.prefill_buckets}")
        if self.max_prefill_tokens_per_step < 1:
            raise ValueError("max_prefill_tokens_per_step must be >= 1")


def resolve_policy(policy: str | Policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    try:
        from .scheduler.registry import make_policy
    except ImportError:
        from .scheduler.fcfs import FCFSPolicy

        if policy != "fcfs":
            raise ValueError(f"unknown policy {policy!r} (only 'fcfs' is available)") from None
        return FCFSPolicy()
    return make_policy(policy)


class LLMEngine:
    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 probe: ProbeHead | None = None, predictor: Any = None):
        self.config = cfg = config or EngineConfig()
        self.model_cfg = model.cfg
        self.tokenizer, self.predictor, self.probe = tokenizer, predictor, probe
        self.policy = resolve_policy(cfg.policy)
        self.blocks = BlockManager(cfg.num_pages, cfg.page_size)
        self.runner = ModelRunner(model, num_slots=cfg.num_slots, num_pages=cfg.num_pages,
                                  page_size=cfg.page_size, max_model_len=cfg.max_model_len,
                                  decode_steps=cfg.decode_steps_per_call, kv_dtype=cfg.dtype,
                                  impl=cfg.kernel_impl, probe=probe,
                                  tensor_parallel=cfg.tensor_parallel)  # [issue 8]
        self.requests: dict[str, Sequence] = {}
        self.waiting: list[Sequence] = []  # waiting + swapped
        self.running: list[Sequence] = []  # admission order
        self.free_slots = list(range(cfg.num_slots - 1, -1, -1))
        self._prefilled: set[str] = set()  # running sequences whose KV covers all but the last token
        self._tap: dict[str, jax.Array] = {}  # running prompt-tap sums of partially prefilled seqs
        self._swapped: dict[str, swap.SwappedKV] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._seed: dict[str, int] = {}
        self._outs: dict[str, RequestOutput] = {}
        self._rng = np.random.default_rng(cfg.seed)
        self.num_preemptions = 0
        self.probe_calls = self.probe_tokens = 0  # probe-only prefills (_probe_waiting)
        self.steps = 0
        self.finished_by_reason: dict[str, int] = {}
        self._finished_tokens = self._finished_count = 0  # mean output length: the router forecast's prior

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None) -> Sequence:
        params = params or SamplingParams()
        self.validate_request(prompt_ids, params)
        priority = check_priority(priority)
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
        now = time.monotonic()
        seq = Sequence(request_id, [int(t) for t in prompt_ids], params,
                       arrival_time if arrival_time is not None else now, priority=priority)
        self.requests[request_id] = seq
        self.waiting.append(seq)
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)
        # mod 2**32: the sampler's uint32 seed column must never fail to cast (SamplingParams checks
        # the range; this keeps a bypassed check from killing the step for every request)
        self._seed[request_id] = (params.seed if params.seed is not None
                                  else int(self._rng.integers(2**31))) % 2**32
        self.policy.on_arrival(seq, now)
        return seq

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request this engine can never serve (reads config only, so
        the async front end may call it from its own thread)."""
        cfg, vocab = self.config, self.model_cfg.vocab_size
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", "must be a SamplingParams")
        if not prompt_ids:
            raise InvalidRequestError("prompt", "must contain at least one token")
        if any((not isinstance(t, int | np.integer)) or t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab})")
        if any(t >= vocab for t in params.forced_output_ids):
            raise InvalidRequestError("forced_output_ids", f"token ids must be in [0, {vocab})")
        if len(prompt_ids) >= cfg.max_model_len:
            raise InvalidRequestError("prompt", f"{len(prompt_ids)} tokens leave no room under "
                                      f"max_model_len={cfg.max_model_len}")
        if self.blocks.pages_for(len(prompt_ids) + 1) > self.blocks.num_usable:
            raise InvalidRequestError("prompt", "longer than the whole KV cache")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel: frees the slot and pages at once. None if the request is unknown or done."""
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self._finish(seq, FinishReason.CANCELLED, time.monotonic())
        return self._outs.pop(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        now = time.monotonic()
        self.steps += 1
        self._outs = {}
        # One prefill token budget per step, shared by probe-only and real prefills, so a step's
        # prefill work (and so how late a cancel or deadline takes effect) stays bounded.
        budget = self.config.max_prefill_tokens_per_step
        budget -= self._probe_waiting(budget - self._pending_prefill_tokens())
        decision = self.policy.schedule(self._scheduler_state(now))
        for seq in decision.preempt:
            if seq.status is Status.RUNNING:
                self.preempt(seq)
        for seq in decision.admit:
            if not self._admit(seq, now):
                break  # keep the policy's order: nothing jumps a request that does not fit yet
        prefilled = self._run_prefills(budget)  # dispatched, not yet fetched
        decoded = self._dispatch_decode({s.request_id for s, *_ in prefilled})
        self._postprocess_prefills(prefilled)  # host work while the decode runs
        self._postprocess_decode(decoded)
        outs, self._outs = list(self._outs.values()), {}
        return outs

    def _scheduler_state(self, now: float) -> SchedulerState:
        self.waiting.sort(key=lambda s: s.arrival_time)
        return SchedulerState(waiting=list(self.waiting), running=list(self.running),
                              free_slots=len(self.free_slots), free_pages=self.blocks.num_free,
                              total_pages=self.blocks.num_usable, page_size=self.config.page_size, now=now)

    def _admit(self, seq: Sequence, now: float) -> bool:
        if seq not in self.waiting:
            return True  # stale entry from the policy: skip it, keep going
        saved = self._swapped.get(seq.request_id)
        # Pages for every token so far (a request swapped mid-prefill still has chunks to write).
        need = self.blocks.pages_for(seq.num_tokens)
        if not self.free_slots or not self.blocks.can_allocate(need):
            return False
        self.waiting.remove(seq)
        pages = self.blocks.allocate(seq, need)
        if saved is not None:
            self._swapped.pop(seq.request_id)
            self.runner.caches = swap.swap_in(self.runner.caches, pages[:saved.num_pages], saved)
        seq.slot = self.free_slots.pop()
        seq.status = Status.RUNNING
        seq.admitted_time = now
        if seq.first_admitted_time is None:
            seq.first_admitted_time = now
        self.running.append(seq)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Running -> waiting (recompute: drop the KV) or swapped (swap: KV to host memory)."""
        if seq.status is not Status.RUNNING:
            raise ValueError(f"{seq.request_id!r} is not running")
        if self.config.preemption_mode == "swap":
            keep = self.blocks.pages_for(seq.num_computed_tokens)
            self._swapped[seq.request_id] = swap.swap_out(self.runner.caches, seq.block_table[:keep])
            seq.status = Status.SWAPPED
        else:
            seq.num_computed_tokens = 0
            self._prefilled.discard(seq.request_id)
            self._tap.pop(seq.request_id, None)
            seq.status = Status.WAITING
        self.blocks.free(seq)
        self._release_slot(seq)
        self.waiting.append(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)

    # ---- prefill ------------------------------------------------------------------------------
    def _pending_prefill_tokens(self) -> int:
        """Tokens of the next prefill chunk of every running request still prefilling (they come
        before probes in a step's budget: they hold slots and pages)."""
        cap = self.config.prefill_buckets[-1]
        return sum(min(s.num_tokens - s.num_computed_tokens, cap) for s in self.running
                   if s.request_id not in self._prefilled)

    def _probe_waiting(self, budget: int) -> int:
        """Predict the length of requests that must wait for a slot, for policies that rank by it.

        The prediction comes from the probe at prefill. A request that waits has had none, so a
        length-aware policy could only rank it blind, or preempt a running request to prefill it and
        learn its length, then preempt it back (measured on the H200: 4 preemptions per request). So
        each such request gets one probe-only prefill: its prompt runs into pages borrowed for the
        call and freed at once; the sampled token and the KV are dropped (the real prefill runs on
        admission, its probe output is the same). Cost: one prefill call per request that waits.
        Prompts longer than one call, or with no pages free, stay unknown (and never preempt).
        Spends at most `budget` prompt tokens; returns the tokens spent.
        """
        if not (self.policy.probe_on_arrival and self.probe is not None and self.predictor is not None):
            return 0
        unknown = sorted((s for s in self.waiting if s.predicted_remaining is None and not s.num_generated
                          and s.status is Status.WAITING), key=lambda s: s.arrival_time)
        # the oldest ones that free slots can take go in unprobed (their real prefill predicts them)
        buckets, spent = self.config.prefill_buckets, 0
        for seq in unknown[len(self.free_slots):]:
            n = seq.num_prompt_tokens
            if n > min(budget, buckets[-1]):
                continue
            need = self.blocks.pages_for(n)
            if not self.blocks.can_allocate(need):
                break
            self.blocks.allocate(seq, need)
            try:
                _, probs, _ = self.runner.prefill(seq.prompt_ids, 0, next(b for b in buckets if b >= n), n,
                                                  seq.block_table, None, self._sampling_rows([seq]))
            finally:
                self.blocks.free(seq)
            budget -= n
            spent += n
            self.probe_calls += 1
            self.probe_tokens += n
            if probs is not None:
                self.predictor.on_prefill(seq, np.asarray(probs)[0])
        return spent

    def _run_prefills(self, budget: int) -> list[tuple[Sequence, jax.Array, jax.Array | None]]:
        """Chunks of sequences still prefilling, in admission order, under the token budget."""
        buckets, done = self.config.prefill_buckets, []
        for seq in list(self.running):
            if seq.request_id in self._prefilled:
                continue
            start = seq.num_computed_tokens
            n = min(seq.num_tokens - start, budget, buckets[-1])
            if n <= 0:
                break
            bucket = next(b for b in buckets if b >= n)
            token, probs, tap = self.runner.prefill(
                seq.all_ids[start:start + n], start, bucket, seq.num_prompt_tokens, seq.block_table,
                self._tap.get(seq.request_id), self._sampling_rows([seq]))
            seq.num_computed_tokens += n
            budget -= n
            if seq.num_computed_tokens < seq.num_tokens:
                self._tap[seq.request_id] = tap
                continue
            self._tap.pop(seq.request_id, None)
            self._prefilled.add(seq.request_id)
            done.append((seq, token, probs))
        return done

    def _postprocess_prefills(self, done) -> None:
        now = time.monotonic()
        for seq, token, probs in done:
            if self.predictor is not None and probs is not None and seq.num_generated == 0:
                self.predictor.on_prefill(seq, np.asarray(probs)[0])
            self._append_token(seq, int(np.asarray(token)[0]), now)

    # ---- decode -------------------------------------------------------------------------------
    def _dispatch_decode(self, skip: set[str]):
        cfg = self.config
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted as a victim earlier in this loop
                continue
            if seq.request_id in skip or seq.request_id not in self._prefilled:
                continue
            n = min(cfg.decode_steps_per_call, seq.max_remaining, cfg.max_model_len - seq.num_tokens)
            if seq.forced_remaining is not None:
                n = min(n, seq.forced_remaining)
            # KV for positions up to num_tokens - 1 + n - 1 is written by this call.
            while not self.blocks.ensure_capacity(seq, seq.num_tokens + n - 1):
                victim = self.policy.choose_victim(self.running, time.monotonic())
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
        batch = [(s, n) for s, n in batch if s.status is Status.RUNNING]  # later victims drop out
        if not batch:
            return None
        s_count, p_max = cfg.num_slots, self.runner.max_pages_per_seq
        tokens, positions, n_valid = (np.zeros(s_count, np.int32) for _ in range(3))
        tables = np.zeros((s_count, p_max), np.int32)
        rows: list[Sequence | None] = [None] * s_count
        for seq, n in batch:
            b = seq.slot
            tokens[b], positions[b], n_valid[b] = seq.all_ids[-1], seq.num_tokens - 1, n
            tables[b, :len(seq.block_table)] = seq.block_table
            rows[b] = seq
        samp = self._sampling_rows(rows, cfg.decode_steps_per_call)
        out_tokens, out_probs = self.runner.decode(tokens, positions, n_valid, tables, samp)
        return batch, out_tokens, out_probs

    def _postprocess_decode(self, decoded) -> None:
        if decoded is None:
            return
        batch, out_tokens, out_probs = decoded
        toks = np.asarray(out_tokens)
        probs = np.asarray(out_probs) if out_probs is not None else None
        now = time.monotonic()
        for seq, n in batch:
            k = 0
            for j in range(n):
                k += 1
                if self._append_token(seq, int(toks[j, seq.slot]), now, finish_free=False):
                    break
            if self.predictor is not None and probs is not None:
                self.predictor.on_decode(seq, probs[k - 1, seq.slot], k)
            if seq.is_finished:
                self._free(seq)
            else:
                seq.num_computed_tokens = seq.num_tokens - 1

    def _sampling_rows(self, seqs: list[Sequence | None], steps: int = 1) -> SamplingRows:
        def col(f, dtype, empty=0):  # empty slots get harmless values (greedy, top_p 1)
            return np.array([f(s) if s is not None else empty for s in seqs], dtype)

        forced = np.full((len(seqs), steps), -1, np.int32)  # trace replay: the given tokens
        for b, s in enumerate(seqs):
            if s is not None and s.params.forced_output_ids:
                forced[b] = [s.forced_token(s.num_generated + j) for j in range(steps)]
        return SamplingRows(col(lambda s: s.params.temperature, np.float32),
                            col(lambda s: s.params.top_p, np.float32, 1.0),
                            col(lambda s: s.params.top_k, np.int32),
                            col(lambda s: self._seed[s.request_id], np.uint32),
                            col(lambda s: s.num_generated, np.int32), forced)

    # ---- postprocess --------------------------------------------------------------------------
    def _append_token(self, seq: Sequence, tok: int, now: float, finish_free: bool = True) -> bool:
        """Append one token, stream it, check stops. True if the sequence finished."""
        p = seq.params
        seq.output_ids.append(tok)
        seq.token_times.append(now)
        if seq.first_token_time is None:
            seq.first_token_time = now
        delta = self._detok[seq.request_id].add([tok])
        out = self._out(seq)
        out.new_token_ids.append(tok)
        out.new_text += delta
        reason, stop_string = None, False
        if p.forced_output_ids:  # trace replay: the given answer ends the request, not eos or stops
            if seq.num_generated >= len(p.forced_output_ids):
                reason = FinishReason.STOP
        elif tok in p.stop_token_ids or (not p.ignore_eos and tok in self.model_cfg.eos_ids):
            reason = FinishReason.STOP
        elif p.stop and p.stop_index(self._detok[seq.request_id].text) is not None:
            reason, stop_string = FinishReason.STOP, True
        if reason is None and (seq.num_generated >= p.max_tokens
                               or seq.num_tokens >= self.config.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None:
            detok = self._detok[seq.request_id]  # _finish may drop it
            self._finish(seq, reason, now, free=finish_free)
            if stop_string:  # the answer ends before the stop string (vLLM): drop it from the stream
                full = detok.text
                cut = p.stop_index(full)
                excess = min(len(full) - cut, len(out.new_text))
                out.new_text = out.new_text[: len(out.new_text) - excess]
        return reason is not None

    def _out(self, seq: Sequence) -> RequestOutput:
        out = self._outs.get(seq.request_id)
        if out is None:
            out = self._outs[seq.request_id] = RequestOutput(seq.request_id, [], "", False, None,
                                                             seq.num_prompt_tokens, 0)
        out.completion_tokens = seq.num_generated
        out.remaining_estimate = seq.predicted_remaining
        return out

    def _finish(self, seq: Sequence, reason: FinishReason, now: float, free: bool = True) -> None:
        seq.status, seq.finish_reason, seq.finish_time = Status.FINISHED, reason, now
        out = self._out(seq)
        out.finished, out.finish_reason = True, reason
        out.new_text += self._detok[seq.request_id].flush()
        self.finished_by_reason[reason.value] = self.finished_by_reason.get(reason.value, 0) + 1
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._finished_tokens += seq.num_generated
            self._finished_count += 1
        self.policy.on_finish(seq, now)
        if free:
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self._release_slot(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        for d in (self._swapped, self._tap, self._detok, self._seed, self.requests):
            d.pop(seq.request_id, None)
        self._prefilled.discard(seq.request_id)

    # ---- reporting / batch API ----------------------------------------------------------------
    def stats(self) -> EngineStats:
        seqs = self.waiting + self.running
        return EngineStats(
            waiting=sum(s.status is Status.WAITING for s in self.waiting), running=len(self.running),
            swapped=len(self._swapped), pages_used=self.blocks.num_used, pages_total=self.blocks.num_usable,
            preemptions=self.num_preemptions,
            outstanding_tokens=float(sum(s.num_prompt_tokens + (s.predicted_remaining if s.predicted_remaining
                                                                 is not None else s.max_remaining)
                                         for s in seqs)),
            finished_by_reason=dict(self.finished_by_reason), steps=self.steps,
            slot_free_tokens=replica_forecast(
                self.running, self.waiting, self.config.num_slots,
                self._finished_tokens / self._finished_count if self._finished_count
                else FORECAST_PRIOR_TOKENS, getattr(self.policy, "counts_down", False)))

    def generate_batch(self, prompt_ids_list: list[list[int]],
                       params_list: SamplingParams | list[SamplingParams] | None = None,
                       progress: bool = True) -> list[Sequence]:
        """Run every prompt to completion; returns the finished Sequences in input order."""
        if params_list is None or isinstance(params_list, SamplingParams):
            params_list = [params_list or SamplingParams()] * len(prompt_ids_list)
        if len(params_list) != len(prompt_ids_list):
            raise InvalidRequestError("params", "need one SamplingParams per prompt")
        base = f"batch{time.monotonic_ns()}-"
        seqs: list[Sequence] = []
        bar = None
        try:
            for i, (p, sp) in enumerate(zip(prompt_ids_list, params_list, strict=True)):
                seqs.append(self.add_request(f"{base}{i}", p, sp))
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(seqs), desc="generate", unit="req")
            while any(not s.is_finished for s in seqs):
                n_done = sum(o.finished for o in self.step())
                if bar is not None:
                    bar.update(n_done)
        except BaseException:
            # A failed call must not leave its requests in the engine: the next call would run them.
            for s in seqs:
                with contextlib.suppress(Exception):  # keep the original error
                    self.abort(s.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return seqs
