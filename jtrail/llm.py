"""`jtrail.LLM`: offline generation API (vLLM-style `generate` and `chat`).

The API validates requests and turns text into ids; a backend turns ids into tokens. The default
backend is the continuous-batching serving engine (paged KV cache, the same engine `jtrail serve`
runs); `backend="reference"` selects the reference backend, the contiguous-cache batched generator of
`jtrail.models.generate` that the engine is tested against ("simple", its former name, still works).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import jax.numpy as jnp

from jtrail.models.generate import GenerationResult, Generator
from jtrail.models.loader import LoadedModel, load_model
from jtrail.serving.engine.llm_engine import EngineConfig
from jtrail.serving.engine.outputs import final_text
from jtrail.serving.frontdoor.chat import check_messages
from jtrail.serving.sequence import FinishReason, InvalidRequestError, SamplingParams
from jtrail.serving.sequence import Sequence as SeqState

Message = dict[str, str]


@dataclass
class Completion:
    prompt: str | None  # the prompt text (after the chat template for chat()); None for id prompts
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Backend(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], progress: bool = True
    ) -> list[GenerationResult]: ...


class EngineBackend:
    """Runs `LLM.generate` on the continuous-batching engine (`serving.engine.llm_engine.LLMEngine`)."""

    def __init__(self, loaded: LoadedModel, num_slots: int = EngineConfig.num_slots, policy: str = "fcfs",
                 max_model_len: int = EngineConfig.max_model_len, page_size: int = EngineConfig.page_size):
        from jtrail.serving.engine.llm_engine import LLMEngine

        max_model_len = min(max_model_len, loaded.cfg.max_model_len)
        # Enough pages for every slot to hold a quarter context; longer mixes preempt and resume.
        pages = 1 + max(num_slots * max_model_len // (4 * page_size), 2 * max_model_len // page_size)
        cfg = EngineConfig(num_slots=num_slots, page_size=page_size, num_pages=pages,
                           max_model_len=max_model_len, policy=policy)
        self.engine = LLMEngine(loaded.model, loaded.tokenizer, cfg)
        self.tokenizer = loaded.tokenizer

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 progress: bool = True) -> list[GenerationResult]:
        seqs = generate_batch(self.engine, [list(p) for p in prompts], list(params), progress=progress)
        rule = self.engine.outputs.stop_rule
        return [GenerationResult(list(s.output_ids), final_text(s, self.tokenizer.decode, rule(s)),
                                 s.finish_reason.value if s.finish_reason else "length", s.num_prompt_tokens)
                for s in seqs]


def generate_batch(engine, prompt_ids_list: list[list[int]],
                   params_list: SamplingParams | list[SamplingParams] | None = None,
                   progress: bool = True) -> list[SeqState]:
    """Run every prompt to completion on `engine` (an LLMEngine); the finished Sequences in input order."""
    if params_list is None or isinstance(params_list, SamplingParams):
        params_list = [params_list or SamplingParams()] * len(prompt_ids_list)
    if len(params_list) != len(prompt_ids_list):
        raise InvalidRequestError("params", "need one SamplingParams per prompt")
    base = f"batch{time.monotonic_ns()}-"
    seqs: list[SeqState] = []
    bar = None
    try:
        for i, (p, sp) in enumerate(zip(prompt_ids_list, params_list, strict=True)):
            seqs.append(engine.add_request(f"{base}{i}", p, sp))
        if progress:
            from tqdm.auto import tqdm

            # counted in tokens, so that it moves with every step, not only when a whole answer ends; the
            # total is the max_tokens budget, and a request that stops early gives back what it left
            bar = tqdm(total=sum(s.params.max_tokens for s in seqs), desc="generate", unit="tok")
        budget = {s.request_id: s.params.max_tokens for s in seqs}
        n_done = 0
        while any(not s.is_finished for s in seqs):
            outs = engine.step()
            if bar is not None:
                moved = sum(len(o.new_token_ids) for o in outs)
                for o in outs:
                    if o.finished and o.request_id in budget:
                        n_done += 1
                        moved += max(0, budget[o.request_id] - o.completion_tokens)
                bar.set_postfix_str(f"{n_done}/{len(seqs)} answers", refresh=False)
                bar.update(moved)
    except BaseException:
        # A failed call must not leave its requests in the engine: the next call would run them.
        for s in seqs:
            with contextlib.suppress(Exception):  # keep the original error
                engine.abort(s.request_id)
        raise
    finally:
        if bar is not None:
            bar.close()
    return seqs


class LLM:
    """Load a model (None = the embedded SmolLM2-135M-Instruct GGUF) and generate from it."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        dtype=jnp.float32,
        num_slots: int = EngineConfig.num_slots,
        backend: Backend | str = "engine",
        progress: bool = True,
    ):
        if backend == "simple":  # the reference backend's former name
            backend = "reference"
        if isinstance(backend, str) and backend not in ("engine", "reference"):  # before the slow load
            raise InvalidRequestError("backend", f"unknown backend {backend!r}; use 'engine' or 'reference'")
        self.loaded: LoadedModel = load_model(model, dtype=dtype, progress=progress)
        self.cfg = self.loaded.cfg
        self.tokenizer = self.loaded.tokenizer
        if backend == "engine":
            backend = EngineBackend(self.loaded, num_slots=num_slots)
        elif backend == "reference":
            backend = Generator(self.loaded.model, self.tokenizer, num_slots=num_slots)
        self.backend: Backend = backend
        self.progress = progress

    def _params(
        self, params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise InvalidRequestError("sampling_params", f"got {len(params)} for {n} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise InvalidRequestError(
                    "sampling_params", f"expected SamplingParams, got {type(p).__name__}"
                )
        return params

    def _check_ids(self, ids: list[int], p: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt", "prompt is empty")
        if len(ids) >= self.cfg.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"{len(ids)} tokens do not fit the {self.cfg.max_model_len}-token "
                f"context with room to generate",
            )
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt", f"token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}"
            )

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Complete each prompt (text or token ids); one Completion per prompt, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequestError("prompts", "no prompts given")
        params = self._params(sampling_params, len(prompts))
        texts: list[str | None] = []
        ids: list[list[int]] = []
        for pr in prompts:
            if isinstance(pr, str):
                if not pr.strip():
                    raise InvalidRequestError("prompt", "prompt is empty")
                texts.append(pr)
                ids.append(self.tokenizer.encode(pr))
            else:
                texts.append(None)
                ids.append([int(t) for t in pr])
        for i, p in zip(ids, params, strict=True):
            self._check_ids(i, p)
        results = self.backend.generate(ids, params, progress=self.progress)
        return [
            Completion(t, r.text, r.token_ids, FinishReason(r.finish_reason), r.prompt_tokens)
            for t, r in zip(texts, results, strict=True)
        ]

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the chat template (validated as the servers do)."""
        try:
            return self.tokenizer.apply_chat_template(check_messages(messages), add_generation_prompt)
        except ValueError as e:  # ChatTemplateError: the template itself rejected the conversation
            if isinstance(e, InvalidRequestError):
                raise
            raise InvalidRequestError("messages", str(e)) from e

    def _chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """Template tokens as control tokens, message content as plain text (never a control token)."""
        try:
            return self.tokenizer.encode_chat(check_messages(messages))
        except ValueError as e:
            if isinstance(e, InvalidRequestError):
                raise
            raise InvalidRequestError("messages", str(e)) from e

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """One conversation ([{"role", "content"}, ...]) or a list of them; answers each with the
        checkpoint's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs:
            raise InvalidRequestError("messages", "no conversations given")
        rendered = [self.render_chat(c) for c in convs]  # type: ignore[arg-type]
        ids = [self._chat_ids(c) for c in convs]  # type: ignore[arg-type]
        outs = self.generate(ids, sampling_params)
        for out, text in zip(outs, rendered, strict=True):
            out.prompt = text
        return outs
