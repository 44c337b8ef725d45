"""A runner with no model: deterministic tokens, so the real engine (its policies, slots, pages,
preemption, stop rules) runs in server and scheduler tests and in `jtrail serve --mock`.

Tokens are byte ids offset by 3 (0..2 are special; 2 is eos), so text round-trips through
`ByteTokenizer`. Output position i of a prompt is a lowercase letter fixed by (prompt, i) (never eos),
or the given token under trace replay. With `probe=True` every sampled token comes with a fake probe
output: the request's exact remaining length (max_tokens minus tokens generated), which
`FakeLengthPredictor` installs as the prediction, so length-aware policies rank by true lengths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from ..paging import pages_for
from ..sequence import Sequence
from .batch import StepBatch, StepOutput

if TYPE_CHECKING:
    from .llm_engine import EngineConfig

BYTE_OFFSET = 3
EOS_ID = 2


def encode_text(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def decode_ids(ids: list[int]) -> str:
    return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET).decode(
        "utf-8", errors="replace")


def fake_token(prompt_ids: list[int], index: int) -> int:
    """Deterministic lowercase letter for output position `index` of a prompt (never eos)."""
    base = sum(prompt_ids) * 31
    return ord("a") + (base + 7 * index) % 26 + BYTE_OFFSET


class ByteTokenizer:
    """The fake runner's tokenizer: UTF-8 bytes offset by 3, a plain-text chat template."""

    def encode(self, text: str, special: bool = False) -> list[int]:
        return encode_text(text)  # bytes only: no control tokens to match

    def decode(self, ids: list[int]) -> str:
        return decode_ids(ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_text("".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.apply_chat_template(messages)


@dataclass(frozen=True)
class FakeModelConfig:
    name: str = "mock"
    vocab_size: int = 256 + BYTE_OFFSET
    eos_ids: tuple[int, ...] = (EOS_ID,)


class FakeRunner:
    """Implements runner.Runner. `step_delay_s` sleeps per executed step (the "device" time)."""

    def __init__(self, num_slots: int, max_model_len: int, page_size: int, step_delay_s: float = 0.0,
                 probe: bool = False):
        self.cfg = FakeModelConfig()
        self.num_slots, self.step_delay_s, self.has_probe = num_slots, step_delay_s, probe
        self.max_pages_per_seq = pages_for(max_model_len, page_size)
        self.calls = 0

    @staticmethod
    def _token(seq: Sequence, index: int) -> int:
        forced = seq.forced_token(index)
        return forced if forced >= 0 else fake_token(seq.prompt_ids, index)

    @staticmethod
    def _remaining(seq: Sequence, generated: int) -> float:
        return float(max(seq.params.max_tokens - generated, 0))

    def execute(self, batch: StepBatch) -> StepOutput:
        """Tokens by output index: the sampling rows' gen_index (which counts, under async
        scheduling, the tokens still in flight), as the JAX runner's sampler keys draws."""
        out = StepOutput()
        if batch.prefills:  # one call for every chunk of the step, as the JAX runner
            self.calls += 1
            chunks = list(zip(batch.prefills, batch.prefill_sampling.gen_index.tolist(), strict=True))
            out.prefill_tokens = np.array([self._token(c.seq, g) for c, g in chunks])
            if self.has_probe:  # remaining after the token this call samples
                out.prefill_probs = np.array([[self._remaining(c.seq, g + 1)] for c, g in chunks])
        if batch.decodes:
            self.calls += 1
            gen = batch.decode_sampling.gen_index
            steps = max(r.steps for r in batch.decodes)
            out.decode_tokens = np.zeros((steps, self.num_slots), np.int64)
            out.decode_probs = np.zeros((steps, self.num_slots, 1)) if self.has_probe else None
            for r in batch.decodes:
                for j in range(r.steps):
                    index = int(gen[r.slot]) + j
                    out.decode_tokens[j, r.slot] = self._token(r.seq, index)
                    if self.has_probe:
                        out.decode_probs[j, r.slot, 0] = self._remaining(r.seq, index + 1)
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
        return out

    def fetch(self, handle: StepOutput) -> StepOutput:
        return handle

    def swap_out(self, pages: list[int]) -> SimpleNamespace:
        return SimpleNamespace(num_pages=len(pages))  # no KV to keep: tokens depend on positions only

    def swap_in(self, pages: list[int], saved: SimpleNamespace) -> None:
        if len(pages) != saved.num_pages:
            raise ValueError(f"swap-in needs {saved.num_pages} pages, got {len(pages)}")

    def warmup(self) -> None:
        pass


class FakeLengthPredictor:
    """Installs the fake probe's output (an exact remaining length) as the request's prediction."""

    refine_every: int | None = 1

    def on_prefill(self, seq: Sequence, probs: np.ndarray) -> None:
        seq.predicted_remaining = seq.initial_prediction = float(probs[0])
        seq.prediction_epoch += 1

    def on_decode(self, seq: Sequence, probs: np.ndarray, n_new: int) -> None:
        seq.predicted_remaining = float(probs[0])


def mock_engine(num_slots: int = 8, num_pages: int = 256, page_size: int = 16, max_queue: int = 1024,
                step_delay_s: float = 0.001, max_model_len: int = 2048, policy="fcfs",
                decode_steps: int = 1, model_name: str = "mock", config: EngineConfig | None = None):
    """An AsyncLLMEngine over the real LLMEngine with a FakeRunner (and fake probe: every policy,
    trail included, runs as it would on a model). `config` (e.g. `jtrail serve`'s) replaces the
    keyword settings."""
    from .async_engine import AsyncLLMEngine
    from .llm_engine import EngineConfig, LLMEngine

    cfg = config or EngineConfig(num_slots=num_slots, num_pages=num_pages, page_size=page_size,
                                 max_model_len=max_model_len, max_queue=max_queue, policy=policy,
                                 decode_steps_per_call=decode_steps)
    runner = FakeRunner(cfg.num_slots, cfg.max_model_len, cfg.page_size, step_delay_s, probe=True)
    engine = LLMEngine(None, ByteTokenizer(), cfg, predictor=FakeLengthPredictor(), runner=runner)
    return AsyncLLMEngine(engine, model_name=model_name)
