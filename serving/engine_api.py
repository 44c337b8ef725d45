"""The narrow engine API the gRPC server, the router and the benchmarks talk to (JetStream style).

`AsyncEngine` is implemented by the real engine (`async_engine.AsyncLLMEngine`) and by
the same engine over `fake_runner.FakeRunner` (`fake_runner.mock_engine`), which lets the server
and router be tested with no model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from .sequence import RequestOutput, SamplingParams


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    swapped: int = 0
    pages_used: int = 0
    pages_total: int = 0
    preemptions: int = 0
    # token-aware routing: prompt tokens + predicted remaining tokens of every unfinished request
    outstanding_tokens: float = 0.0
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    steps: int = 0  # engine steps run so far (lets tests bound how fast a cancel frees resources)
    # token-aware routing: decode steps until each batch slot is free for a new arrival, ascending
    # (router.slot_forecast); empty when the engine does not forecast
    slot_free_tokens: list[float] = field(default_factory=list)
    # running totals: prompt tokens of requests that produced their first token, output tokens streamed
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


@dataclass
class ModelInfo:
    model_name: str
    max_model_len: int
    vocab_size: int
    policy: str
    num_slots: int
    page_size: int
    num_pages: int
    probe: str | None = None


class AsyncEngine(Protocol):
    """Submit requests and stream their outputs; all methods are called from one asyncio loop."""

    def info(self) -> ModelInfo: ...

    def stats(self) -> EngineStats: ...

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Validates (raises InvalidRequestError / QueueFullError before the first yield), enqueues,
        and yields one RequestOutput per step that produced tokens, the last with finished=True.
        Closing the iterator early (client gone) cancels the request and frees its slot and pages."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def start(self) -> None: ...

    async def shutdown(self, grace_s: float = 5.0) -> None: ...
