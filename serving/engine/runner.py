"""The runner interface: what the engine asks of the device side.

`execute(batch)` dispatches one step (returns a handle without waiting), `fetch(handle)` brings the
results to the host once, `swap_out`/`swap_in` move a sequence's KV pages to host memory and back,
`warmup` compiles ahead of traffic. Implementations: `model_runner.ModelRunner` (JAX, paged KV
cache) and `fake_runner.FakeRunner` (deterministic tokens, no model) for server and scheduler tests.
`calls` counts device calls, so tests can bound the calls per step.
"""

from __future__ import annotations

from typing import Any, Protocol

from .batch import StepBatch, StepOutput


class Runner(Protocol):
    max_pages_per_seq: int
    has_probe: bool  # returns probe bin probabilities with every sampled token
    calls: int  # device calls made so far (prefill and decode calls; swaps not counted)

    def execute(self, batch: StepBatch) -> Any: ...

    def fetch(self, handle: Any) -> StepOutput: ...

    def swap_out(self, pages: list[int]) -> Any: ...

    def swap_in(self, pages: list[int], saved: Any) -> None: ...

    def warmup(self) -> None: ...
