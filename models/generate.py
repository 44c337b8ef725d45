"""The reference backend: batched generation over a contiguous KV cache, one jitted prefill and one jitted
decode step per token; no pages, no scheduler, no preemption.

`jtrail.LLM(backend="reference")` runs it. It is kept as the independent check of the serving engine
(continuous batching, paged KV): the same prompts must give the same greedy tokens on both
(tests/test_llm.py). Shapes are bucketed to powers of two so a handful of compilations
serve any mix of prompts. Sampling parameters are duck-typed (`SamplingLike`) so `models` does not
depend on `serving`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .attention import ContiguousMeta, contiguous_cache_attention, init_contiguous_cache
from .llama import Llama
from .sampling import sample_tokens
from .shapes import pow2_bucket
from .tokenizer import Tokenizer


class SamplingLike(Protocol):
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos, stop id or stop string) or "length" (max_tokens or context)
    prompt_tokens: int


def _forward_sample(graphdef, state, tokens, positions, logits_index, caches, keys, step, temp, top_p, top_k):
    model = nnx.merge(graphdef, state)
    out = model(
        tokens,
        positions,
        caches,
        contiguous_cache_attention,
        ContiguousMeta(positions),
        logits_index=logits_index,
    )
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    return sample_tokens(out.logits, step_keys, temp, top_p, top_k), out.caches


# One jitted function for prefill and decode (T differs); the cache is donated so it updates in place.
_step = jax.jit(_forward_sample, static_argnums=0, donate_argnums=5)


class Generator:
    def __init__(self, model: Llama, tokenizer: Tokenizer, num_slots: int = 8):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.num_slots = num_slots
        self.graphdef, self.state = nnx.split(model)
        self.eos_ids = set(self.cfg.eos_ids) | set(tokenizer.eos_ids)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingLike], progress: bool = True
    ) -> list[GenerationResult]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        results: list[GenerationResult | None] = [None] * len(prompts)
        # Similar lengths share a batch: less padding, and fewer distinct shapes to compile.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        bar = tqdm(
            total=len(prompts), desc="generate", unit="prompt", disable=not progress or len(prompts) < 2
        )
        for start in range(0, len(order), self.num_slots):
            idx = order[start : start + self.num_slots]
            for i, r in zip(
                idx, self._generate_batch([prompts[i] for i in idx], [params[i] for i in idx]), strict=True
            ):
                results[i] = r
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, prompts: list[Sequence[int]], params: list[SamplingLike]
    ) -> list[GenerationResult]:
        n, cfg = len(prompts), self.cfg
        b = pow2_bucket(n, 1)
        lens = np.array([len(p) for p in prompts] + [1] * (b - n), np.int32)
        t = pow2_bucket(int(lens.max()), 16)
        need = max(int(lens[i]) + params[i].max_tokens for i in range(n))
        s = min(pow2_bucket(need, 64), cfg.max_model_len)
        tokens = np.zeros((b, t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        positions = np.where(np.arange(t)[None] < lens[:, None], np.arange(t)[None], -1).astype(np.int32)
        seeds = [p.seed if p.seed is not None else secrets.randbits(31) for p in params] + [0] * (b - n)
        keys = jnp.stack([jax.random.PRNGKey(sd) for sd in seeds])

        def col(name, pad):
            return jnp.asarray([getattr(p, name) for p in params] + [pad] * (b - n))

        temp, top_p, top_k = (
            col("temperature", 0.0).astype(jnp.float32),
            col("top_p", 1.0).astype(jnp.float32),
            col("top_k", 0).astype(jnp.int32),
        )
        caches = init_contiguous_cache(cfg.n_layers, b, s, cfg.n_kv_heads, cfg.head_dim, self.model.dtype)
        nxt, caches = _step(
            self.graphdef,
            self.state,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            jnp.asarray(lens - 1),
            caches,
            keys,
            0,
            temp,
            top_p,
            top_k,
        )
        out: list[list[int]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        texts: list[str | None] = [None] * n
        cur = lens.copy()  # position of the token being fed next
        step = 0
        while True:
            host = np.asarray(nxt)
            for i in range(n):
                if reasons[i] is None:
                    reasons[i], texts[i] = self._check(out[i], int(host[i]), params[i], int(cur[i]), s)
            if all(r is not None for r in reasons):
                break
            step += 1
            pos = np.where([i < n and reasons[i] is None for i in range(b)], cur, -1).astype(np.int32)
            cur = cur + 1
            nxt, caches = _step(
                self.graphdef,
                self.state,
                nxt[:, None],
                jnp.asarray(pos)[:, None],
                jnp.zeros((b,), jnp.int32),
                caches,
                keys,
                step,
                temp,
                top_p,
                top_k,
            )
        return [GenerationResult(out[i], texts[i], reasons[i], len(prompts[i])) for i in range(n)]  # type: ignore

    def _check(
        self, ids: list[int], tok: int, p: SamplingLike, pos: int, cache_len: int
    ) -> tuple[str | None, str | None]:
        """Append `tok`; return (finish_reason, final_text) once the row is done, else (None, None)."""
        ids.append(tok)
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop", self.tokenizer.decode(ids[:-1])  # the stop token is counted, not shown
        if p.stop:
            text = self.tokenizer.decode(ids)
            cut = p.stop_index(text)
            if cut is not None:
                return "stop", text[:cut]
        # `pos` is where `tok` would be written: the cache (or context) must have room for it.
        if len(ids) >= p.max_tokens or pos + 1 > cache_len:
            return "length", self.tokenizer.decode(ids)
        return None, None
