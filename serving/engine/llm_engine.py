"""LLMEngine: continuous batching over fixed slots with a paged KV cache.

`step()` has three beats (nano-vllm, vLLM v1's EngineCore.step):
    1. scheduler side (step_scheduler.py): the policy's preemptions and admissions, decode rows,
       prefill chunks and probe-only prefills under the token budget -> one `StepBatch`;
    2. the runner (runner.py: the JAX ModelRunner or the FakeRunner) executes it; results are
       fetched to the host once;
    3. the output processor (outputs.py) appends tokens, checks stops, detokenizes, finishes, frees.
Per-request engine state lives in one record (request_state.EngineRequest).

With `EngineConfig.async_scheduling` (vLLM v1's async scheduling) a step schedules and dispatches
batch N+1 before it fetches and processes batch N, so the host's scheduling and input preparation
run while the device computes N, and output processing while it computes N+1. Decode rows of N+1
take N's sampled tokens on the device (batch.Fed); N's outputs arrive one step late. With
`steps_in_flight` 2 the host runs two steps ahead (it processes N-1 after dispatching N+1), so the
next launch never waits for the latest tokens. Every request's tokens, text and finish are the
synchronous engine's (tests/test_async_scheduling.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..brain.forecast import FORECAST_PRIOR_TOKENS, replica_forecast
from ..brain.predictor import Predictor
from ..brain.prompt_estimator import PromptLengthEstimator
from ..engine_api import EngineStats
from ..sequence import (
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    Sequence,
    Status,
    check_priority,
)
from .batch import SamplingRows, StepBatch
from .config import EngineConfig, StepStats, resolve_policy
from .detokenizer import Tokenizer, detokenizer_for
from .outputs import OutputProcessor
from .request_state import EngineRequest, lose_results
from .runner import Runner
from .sampling import SlotSampling, fill_sampling, link_fed, sampling_rows
from .step_scheduler import StepScheduler
from .validation import check_host_estimate, check_oracle_length, check_request
from .warmup import warm_up


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 probe: Any = None, predictor: Predictor | None = None, runner: Runner | None = None,
                 prompt_estimator: PromptLengthEstimator | None = None):
        """`model` (a Llama) builds the JAX runner; or pass `runner` (e.g. a FakeRunner, whose `cfg`
        then gives vocab_size and eos_ids) and model=None. `prompt_estimator`: the arrival estimate of
        a policy with `arrival_estimate="host"` (required then: InvalidRequestError without it)."""
        self.config = cfg = config or EngineConfig()
        self.tokenizer, self.predictor, self.probe = tokenizer, predictor, probe
        self.prompt_estimator = prompt_estimator
        if runner is None:
            from .model_runner import ModelRunner  # JAX: imported only when a model is served

            runner = ModelRunner(model, probe=probe, **cfg.runner_options())
        self.runner = runner
        self.model_cfg = model.cfg if model is not None else runner.cfg
        self.policy = resolve_policy(cfg.policy)
        self.policy.on_preemption_mode(cfg.preemption_mode)
        self._estimate_on_arrival = self.policy.arrival_estimate == "host"
        if self._estimate_on_arrival:
            check_host_estimate(prompt_estimator, predictor)
        self._reqs: dict[str, EngineRequest] = {}
        self.scheduler = StepScheduler(cfg, self.policy, runner, self._reqs,
                                       probe_waiting=runner.has_probe and predictor is not None)
        self.outputs = OutputProcessor(self.model_cfg.eos_ids, cfg.max_model_len, self.policy, predictor,
                                       self._free)
        self._rng = np.random.default_rng(cfg.seed)
        self._slot_sampling = SlotSampling(cfg.num_slots)  # the decode rows' sampling, kept per slot
        self.steps = 0
        self.last_step = StepStats()
        # async: the dispatched, unprocessed steps (batch, runner handle), oldest first
        self._in_flight: deque[tuple[StepBatch, Any]] = deque()
        # async scheduling: how many steps run ahead of the one whose outputs a step processes (0: sync)
        self.steps_in_flight = cfg.resolved_steps_in_flight()
        self.batches_processed = 0  # batches whose outputs a step has processed (benchmarks pair them)
        self._lost: set[str] = set()  # requests whose step failed (request_state.lose_results)
        # token counters for the throughput log and metrics (vLLM's: a prompt counts once, at its
        # first output token; every streamed output token counts)
        self.prompt_tokens_total = self.generation_tokens_total = 0

    # the scheduler side's state, under the names the benchmarks and tests use
    blocks = property(lambda self: self.scheduler.blocks)
    waiting = property(lambda self: self.scheduler.waiting)
    running = property(lambda self: self.scheduler.running)
    free_slots = property(lambda self: self.scheduler.free_slots)
    num_preemptions = property(lambda self: self.scheduler.num_preemptions)
    probe_calls = property(lambda self: self.scheduler.probe_calls)
    probe_tokens = property(lambda self: self.scheduler.probe_tokens)
    finished_by_reason = property(lambda self: self.outputs.finished_by_reason)

    def warmup(self, report: Callable[[str], None] | None = None) -> float:
        """Compile every packed prefill shape and the decode step before traffic (warmup.py); returns
        the seconds it took and leaves the engine empty. `report` gets one line per shape (default:
        this package's logger)."""
        return warm_up(self) if report is None else warm_up(self, report)

    def pending_output_ids(self) -> set[str]:
        """Requests with output not yet returned by a step (a failed step's, for the front end),
        and those whose results a failed step lost."""
        self._lost &= self._reqs.keys()  # the front end aborted them (or they finished)
        return set(self.outputs.pending) | self._lost

    requests = property(lambda self: {rid: st.seq for rid, st in self._reqs.items()})  # in flight

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None,
                    oracle_length: int | None = None) -> Sequence:
        """Queue a request. `oracle_length`: its true output length, for srpt-oracle's rank and
        benchmarks that force lengths (set before the policy files the request)."""
        params = params or SamplingParams()
        self.validate_request(prompt_ids, params)
        priority = check_priority(priority)
        check_oracle_length(oracle_length)
        if request_id in self._reqs:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
        now = time.monotonic()
        seq = Sequence(request_id, [int(t) for t in prompt_ids], params,
                       arrival_time if arrival_time is not None else now, priority=priority,
                       oracle_remaining_at_start=oracle_length)
        # mod 2**32: the sampler's uint32 seed column must never fail to cast (SamplingParams checks
        # the range; this keeps a bypassed check from failing the step for every request)
        seed = (params.seed if params.seed is not None else int(self._rng.integers(2**31))) % 2**32
        detok = detokenizer_for(self.tokenizer, seq.prompt_ids)
        if self._estimate_on_arrival:  # before the policy files it: it ranks by this estimate
            self.predictor.on_prefill(seq, self.prompt_estimator.probs(seq.prompt_ids))
        self._reqs[request_id] = EngineRequest(seq, detok, seed, self.outputs.stop_rule(seq))
        self.scheduler.enqueue(seq)
        self.policy.on_arrival(seq, now)
        return seq

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request this engine can never serve (reads config only, so
        the async front end may call it from its own thread)."""
        check_request(prompt_ids, params, self.model_cfg.vocab_size, self.config.max_model_len, self.blocks)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel: frees the slot and pages at once. None if the request is unknown or done."""
        self._lost.discard(request_id)
        st = self._reqs.get(request_id)
        if st is None or st.seq.is_finished:
            return None
        self.outputs.finish(st, FinishReason.CANCELLED, time.monotonic())
        return self.outputs.pending.pop(request_id)

    def newest_in_flight(self) -> Any:
        """The runner's handle of the newest step dispatched and not yet processed (None if none is):
        benchmarks wait on it to time the device alone."""
        return self._in_flight[-1][1] if self._in_flight else None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    def preempt(self, seq: Sequence) -> None:
        """Running -> waiting (recompute) or swapped (swap)."""
        self.scheduler.preempt(seq)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.steps += 1
        t0 = time.perf_counter()
        batch = done = None
        try:
            batch = self.scheduler.schedule(time.monotonic())  # 1. what runs
            self.last_step = StepStats(
                batch_tokens=sum(len(c.tokens) for c in batch.prefills) + sum(r.steps for r in batch.decodes),
                kv_tokens=sum(c.seq.num_tokens for c in batch.prefills if not c.probe_only)
                + sum(r.position + 1 for r in batch.decodes),
                prefill_chunks=len(batch.prefills), decode_rows=len(batch.decodes))
            if not batch.empty:
                if self._in_flight:
                    link_fed(batch, self._in_flight[-1][0])
                fill_sampling(batch, self._reqs, self._slot_sampling, self.config.decode_steps_per_call)
                self._in_flight.append((batch, self.runner.execute(batch)))  # 2. run it (not waited for)
                self.scheduler.return_borrowed(batch)
            # async: the steps before finish on the device meanwhile; the oldest is processed once
            # more than steps_in_flight are dispatched (or when nothing new was)
            keep = self.steps_in_flight if not batch.empty else 0
            if len(self._in_flight) > keep:
                done = self._in_flight.popleft()
                result = self.runner.fetch(done[1])  # the step's one host sync
                self.outputs.process(done[0], result, self._reqs, time.monotonic())  # 3. tokens out
                self.batches_processed += 1
        except Exception:
            failed = [batch, done[0] if done is not None else None, *(b for b, _ in self._in_flight)]
            self._in_flight.clear()
            self._lost |= lose_results(failed, self._reqs)
            raise
        outs = self.outputs.take()
        self.last_step = self.last_step._replace(seconds=time.perf_counter() - t0)
        for o in outs:
            self.generation_tokens_total += len(o.new_token_ids)
            if o.new_token_ids and o.completion_tokens == len(o.new_token_ids):  # its first tokens
                self.prompt_tokens_total += o.prompt_tokens
        return outs

    def _sampling_rows(self, seqs: list[Sequence | None], steps: int = 1) -> SamplingRows:
        return sampling_rows(seqs, self._reqs, steps)

    def _free(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._reqs.pop(seq.request_id, None)

    # ---- reporting ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        seqs = self.waiting + self.running
        return EngineStats(
            waiting=sum(s.status is Status.WAITING for s in self.waiting), running=len(self.running),
            swapped=sum(st.seq.status is Status.SWAPPED for st in self._reqs.values()),
            pages_used=self.blocks.num_used, pages_total=self.blocks.num_usable,
            preemptions=self.num_preemptions,
            outstanding_tokens=float(sum(s.num_prompt_tokens + (s.predicted_remaining if s.predicted_remaining
                                                                 is not None else s.max_remaining)
                                         for s in seqs)),
            finished_by_reason=dict(self.finished_by_reason), steps=self.steps,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            slot_free_tokens=replica_forecast(
                self.running, self.waiting, self.config.num_slots,
                self.outputs.finished_tokens / self.outputs.finished_count if self.outputs.finished_count
                else FORECAST_PRIOR_TOKENS, self.policy.counts_down))

    def generate_batch(self, prompt_ids_list: list[list[int]], params_list=None, progress: bool = True):
        """Kept for callers of the old method: see jtrail.llm.generate_batch."""
        from jtrail.llm import generate_batch
        return generate_batch(self, prompt_ids_list, params_list, progress=progress)

