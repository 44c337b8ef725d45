"""A model-free `AsyncEngine` (JetStream style) so the gRPC server and router are testable on CPU.

It keeps the real engine's resource model — fixed batch slots, a KV page pool with per-request pages,
a bounded waiting queue, preemption by recompute when pages run out — but "decodes" fake,
deterministic tokens after a configurable per-step delay. Tokens are byte ids offset by 3 (0..2 are
special; 2 is eos), so text round-trips through `encode`/`decode`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine_api import EngineStats, ModelInfo
from .mock_state import MockRequest, MockScheduler
from .router import slot_forecast
from .sequence import FinishReason, InvalidRequestError, QueueFullError, RequestOutput, SamplingParams

BYTE_OFFSET = 3
EOS_ID = 2


@dataclass
class MockEngineConfig:
    num_slots: int = 8
    num_pages: int = 256
    page_size: int = 16
    max_queue: int = 1024
    step_delay_s: float = 0.001  # per decode step: simulates device time
    max_context: int = 2048
    vocab_size: int = 256 + BYTE_OFFSET
    policy: str = "fcfs"
    model_name: str = "mock"


def encode_text(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def decode_ids(ids: list[int]) -> str:
    return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET).decode(
        "utf-8", errors="replace")


def fake_token(prompt_ids: list[int], index: int) -> int:
    """Deterministic lowercase letter for output position `index` of a prompt (never eos)."""
    base = sum(prompt_ids) * 31
    return ord("a") + (base + 7 * index) % 26 + BYTE_OFFSET


class MockEngine:
    """Implements `engine_api.AsyncEngine`; all methods run on one asyncio loop."""

    def __init__(self, config: MockEngineConfig | None = None):
        self.config = config or MockEngineConfig()
        c = self.config
        self.sched = MockScheduler(c.num_slots, c.num_pages, c.page_size, priority=c.policy == "priority")
        self.steps = 0
        self._finished_by_reason: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    # --- AsyncEngine -----------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(model_name=c.model_name, max_context=c.max_context, vocab_size=c.vocab_size,
                         policy=c.policy, num_slots=c.num_slots, page_size=c.page_size,
                         num_pages=c.num_pages, probe=None)

    def stats(self) -> EngineStats:
        s = self.sched
        outstanding = sum(r.num_prompt + r.params.max_tokens - len(r.output_ids)
                          for r in list(s.waiting) + s.running)
        return EngineStats(waiting=len(s.waiting), running=len(s.running), swapped=0,
                           pages_used=s.pages_used, pages_total=self.config.num_pages,
                           preemptions=s.preemptions, outstanding_tokens=float(outstanding),
                           finished_by_reason=dict(self._finished_by_reason), steps=self.steps,
                           # the mock generates max_tokens (no eos): its remaining counts are exact
                           slot_free_tokens=slot_forecast(
                               [r.params.max_tokens - len(r.output_ids) for r in s.running],
                               [r.params.max_tokens - len(r.output_ids) for r in s.waiting],
                               self.config.num_slots))

    def encode(self, text: str) -> list[int]:
        return encode_text(text)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        return encode_text(rendered)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        self._validate(prompt_ids, params)
        if self.sched.find(request_id) is not None:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if self._stopping:
            raise QueueFullError("engine is shutting down")
        if len(self.sched.waiting) >= self.config.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
        req = MockRequest(request_id, list(prompt_ids), params, priority, time.monotonic())
        self.sched.add(req)
        self._wake.set()
        try:
            while True:
                out = await req.outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            # Client gone (iterator closed) or cancelled: free the slot and pages right now.
            if not req.finished:
                self._finish(req, FinishReason.CANCELLED)

    async def abort(self, request_id: str) -> None:
        req = self.sched.find(request_id)
        if req is not None:
            self._finish(req, FinishReason.CANCELLED)
            req.outputs.put_nowait(self._output(req, [], FinishReason.CANCELLED))

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="mock-engine-loop")

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, let running ones finish for up to `grace_s`, then cancel the rest."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        while (self.sched.waiting or self.sched.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for req in list(self.sched.waiting) + list(self.sched.running):
            await self.abort(req.request_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- internals -------------------------------------------------------------------------------
    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        c = self.config
        if not prompt_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(prompt_ids) >= c.max_context:
            raise InvalidRequestError("prompt", f"{len(prompt_ids)} tokens leave no room in the "
                                                f"{c.max_context}-token context")
        if len(prompt_ids) + params.max_tokens > c.max_context:
            raise InvalidRequestError("max_tokens", f"{params.max_tokens} + {len(prompt_ids)} prompt "
                                                    f"tokens exceeds the {c.max_context}-token context")
        if self.sched.pages_for(len(prompt_ids) + params.max_tokens) > c.num_pages:
            raise InvalidRequestError("max_tokens", f"prompt + max_tokens need more than the "
                                                    f"{c.num_pages} KV pages of this server")
        if any(not 0 <= t < c.vocab_size for t in prompt_ids):
            raise InvalidRequestError("prompt.token_ids", f"ids must be in [0, {c.vocab_size})")

    def _output(self, req: MockRequest, new_ids: list[int], reason: FinishReason | None) -> RequestOutput:
        return RequestOutput(request_id=req.request_id, new_token_ids=new_ids, new_text=decode_ids(new_ids),
                             finished=reason is not None, finish_reason=reason,
                             prompt_tokens=req.num_prompt, completion_tokens=len(req.output_ids),
                             remaining_estimate=float(req.params.max_tokens - len(req.output_ids)))

    def _finish(self, req: MockRequest, reason: FinishReason) -> None:
        if req.finished:
            return
        req.finished = True
        self.sched.remove(req)
        self._finished_by_reason[reason.value] = self._finished_by_reason.get(reason.value, 0) + 1

    def _step(self) -> None:
        """One engine step: admit, grow pages (preempting if short), emit one token per running req."""
        self.steps += 1
        self.sched.admit()
        for req in list(self.sched.running):
            if req.slot is None:
                continue  # preempted earlier in this step to make room for another request
            if not self.sched.ensure_page_for_next_token(req):
                continue  # req itself was preempted back to the waiting queue
            tok = fake_token(req.prompt_ids, len(req.output_ids))
            req.output_ids.append(tok)
            p = req.params
            reason = None
            if tok in p.stop_token_ids or (not p.ignore_eos and tok == EOS_ID):
                reason = FinishReason.STOP
            elif p.stop and any(s in decode_ids(req.output_ids) for s in p.stop):
                reason = FinishReason.STOP
            elif len(req.output_ids) >= p.max_tokens:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(req, reason)
            req.outputs.put_nowait(self._output(req, [tok], reason))

    async def _loop(self) -> None:
        while True:
            if not (self.sched.waiting or self.sched.running):
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.config.step_delay_s)  # the "device" runs the step
            self._step()
