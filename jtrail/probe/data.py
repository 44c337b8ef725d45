"""Training data for TRAIL's probe head: greedy answers, then per-token hidden states of candidate layers.

Two device passes, both bucketed so that only a few shapes compile:
1. `generate_greedy`: batched greedy decoding with a contiguous KV cache; the whole decode loop of a
   batch is one jitted `while_loop` (no host round trip per token).
2. `collect_features`: one teacher-forced forward over prompt + answer per request, tapping every
   candidate layer at once (`tap_layer` as a tuple). It keeps, per request, the mean prompt state (the
   input of the prefill estimate) and, for each generated token the engine would feed back
   (tokens 1..n-1 of an n-token answer), its state and remaining length n - j.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jtrail.models.attention import (
    ContiguousMeta,
    DenseMeta,
    contiguous_cache_attention,
    dense_causal_attention,
    init_contiguous_cache,
)
from jtrail.models.errors import JtrailError
from jtrail.models.llama import Llama
from jtrail.models.shapes import pow2_bucket

_F16_MAX = float(np.finfo(np.float16).max)


class FeatureCacheError(JtrailError, ValueError):
    """A features cache file that is missing fields or does not match the requested layers."""


@dataclass
class ProbeFeatures:
    layers: tuple[int, ...]
    prompt_states: np.ndarray  # [N, L, d] f16: mean over prompt tokens
    token_states: np.ndarray  # [M, L, d] f16: state of generated token j (fed back at step j)
    token_request: np.ndarray  # [M] int32: request index of each token sample
    token_generated: np.ndarray  # [M] int32: j, tokens generated when the state is read (>= 1)
    output_lengths: np.ndarray  # [N] int32: answer length n (eos included)
    prompt_lengths: np.ndarray  # [N] int32
    finished: np.ndarray  # [N] bool: ended with eos (False: capped at max_new_tokens)
    max_new_tokens: int
    request_split: np.ndarray | None = None  # [N] str: replay split of each request (None: natural mode)

    @property
    def num_requests(self) -> int:
        return int(self.output_lengths.shape[0])

    @property
    def token_remaining(self) -> np.ndarray:
        return (self.output_lengths[self.token_request] - self.token_generated).astype(np.int32)

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise FeatureCacheError(f"layer {layer} not in cached features (layers {list(self.layers)})")
        return self.layers.index(layer)

    def save(self, path: str | Path) -> None:
        extra = {} if self.request_split is None else {"request_split": np.asarray(self.request_split, str)}
        np.savez(Path(path), layers=np.asarray(self.layers, np.int32), prompt_states=self.prompt_states,
                 token_states=self.token_states, token_request=self.token_request,
                 token_generated=self.token_generated, output_lengths=self.output_lengths,
                 prompt_lengths=self.prompt_lengths, finished=self.finished,
                 max_new_tokens=np.int32(self.max_new_tokens), **extra)

    @classmethod
    def load(cls, path: str | Path) -> ProbeFeatures:
        path = Path(path)
        if not path.is_file():
            raise FeatureCacheError(f"features cache {path} does not exist")
        with np.load(path) as z:
            missing = {"layers", "prompt_states", "token_states", "token_request", "token_generated",
                       "output_lengths", "prompt_lengths", "finished", "max_new_tokens"} - set(z.files)
            if missing:
                raise FeatureCacheError(f"features cache {path} lacks {sorted(missing)}")
            return cls(layers=tuple(int(x) for x in z["layers"]), prompt_states=z["prompt_states"],
                       token_states=z["token_states"], token_request=z["token_request"],
                       token_generated=z["token_generated"], output_lengths=z["output_lengths"],
                       prompt_lengths=z["prompt_lengths"], finished=z["finished"],
                       max_new_tokens=int(z["max_new_tokens"]),
                       request_split=z["request_split"].astype(str) if "request_split" in z.files else None)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _generate_batch(graphdef, state, tokens, lengths, max_new: int, eos):
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    cfg = model.cfg
    caches = init_contiguous_cache(cfg.n_layers, b, p + max_new, cfg.n_kv_heads, cfg.head_dim, model.dtype)
    ar = jnp.arange(p)[None, :]
    pos = jnp.where(ar < lengths[:, None], ar, -1)
    out = model(tokens, jnp.maximum(pos, 0), caches, contiguous_cache_attention, ContiguousMeta(pos),
                logits_index=lengths - 1)
    tok = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, caches, tok, done, toks, n = c
        toks = toks.at[:, i].set(jnp.where(done, -1, tok))
        n = n + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        step_pos = jnp.where(done, -1, lengths + i)[:, None]
        o = model(tok[:, None], jnp.maximum(step_pos, 0), caches, contiguous_cache_attention,
                  ContiguousMeta(step_pos), logits_index=jnp.zeros((b,), jnp.int32))
        return i + 1, o.caches, jnp.argmax(o.logits, axis=-1).astype(jnp.int32), done, toks, n

    init = (jnp.int32(0), out.caches, tok, jnp.zeros((b,), bool), jnp.full((b, max_new), -1, jnp.int32),
            jnp.zeros((b,), jnp.int32))
    _, _, _, done, toks, n = jax.lax.while_loop(cond, body, init)
    return toks, n, done


def generate_greedy(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_ids: Sequence[int], batch_size: int = 64, progress: bool = True,
                    min_prompt_bucket: int = 128) -> tuple[list[list[int]], np.ndarray]:
    """Greedy answers (eos included when reached) and whether each one ended with eos. Prompt lengths
    are padded to powers of two >= `min_prompt_bucket`: one compiled decode loop per bucket."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)
    bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        p = pow2_bucket(max(len(prompts[i]) for i in idx), min_prompt_bucket)
        # Pad the batch to a fixed size with copies of a 1-token prompt so every call shares a shape.
        toks = np.zeros((batch_size, p), np.int32)
        lens = np.ones((batch_size,), np.int32)
        for r, i in enumerate(idx):
            toks[r, :len(prompts[i])] = prompts[i]
            lens[r] = len(prompts[i])
        out, n, done = _generate_batch(graphdef, state, jnp.asarray(toks), jnp.asarray(lens),
                                       max_new_tokens, eos)
        out, n, done = np.asarray(out), np.asarray(n), np.asarray(done)
        for r, i in enumerate(idx):
            answers[i] = out[r, :n[r]].tolist()
            finished[i] = bool(done[r])
        bar.update(len(idx))
    bar.close()
    return answers, finished


@functools.partial(jax.jit, static_argnums=(0, 5))
def _tap_batch(graphdef, state, tokens, lengths, prompt_lengths, layers: tuple[int, ...]):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    out = model(tokens, positions, None, dense_causal_attention, DenseMeta(lengths), tap_layer=layers,
                logits_index=jnp.zeros((b,), jnp.int32))
    tap = out.tap.astype(jnp.float32)  # [L, B, T, d]
    in_prompt = (jnp.arange(t)[None, :] < prompt_lengths[:, None]).astype(jnp.float32)
    prompt_mean = jnp.einsum("lbtd,bt->lbd", tap, in_prompt) / prompt_lengths[None, :, None]
    clip = lambda x: jnp.clip(x, -_F16_MAX, _F16_MAX).astype(jnp.float16)
    return clip(prompt_mean), clip(tap)


def collect_features(model: Llama, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                     finished: np.ndarray, layers: Sequence[int], max_new_tokens: int,
                     token_budget: int = 16384, progress: bool = True) -> ProbeFeatures:
    """Teacher-forced forward over prompt + answer; see the module docstring for what is kept."""
    layers = tuple(int(x) for x in layers)
    n_layers = model.cfg.n_layers
    if not layers or any(not 0 <= x < n_layers for x in layers):
        raise ValueError(f"layers must be in [0, {n_layers}), got {list(layers)}")
    if len(prompts) != len(answers) or len(answers) != len(finished):
        raise ValueError("prompts, answers and finished must have the same length")
    graphdef, state = nnx.split(model)
    # The engine feeds back answer tokens 1..n-1 (token n ends the request), so they are all we need.
    seqs = [list(p) + list(a[:-1]) for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    d = model.cfg.d_model
    prompt_states = np.zeros((len(seqs), len(layers), d), np.float16)
    tok_states, tok_req, tok_gen = [], [], []
    bar = tqdm(total=len(seqs), desc="features", unit="req", disable=not progress)
    start = 0
    while start < len(order):
        t = pow2_bucket(len(seqs[order[start]]), 64)
        rows = max(1, token_budget // t)
        idx = [i for i in order[start:start + rows] if len(seqs[i]) <= t]
        start += len(idx)
        rows = min(rows, pow2_bucket(len(idx), 1))  # a small tail batch is not padded to the full budget
        toks = np.zeros((rows, t), np.int32)
        lens, plens = np.ones((rows,), np.int32), np.ones((rows,), np.int32)
        for r, i in enumerate(idx):
            toks[r, :len(seqs[i])] = seqs[i]
            lens[r], plens[r] = len(seqs[i]), len(prompts[i])
        pm, tap = _tap_batch(graphdef, state, jnp.asarray(toks), jnp.asarray(lens), jnp.asarray(plens),
                             layers)
        pm, tap = np.asarray(pm), np.asarray(tap)
        for r, i in enumerate(idx):
            prompt_states[i] = pm[:, r]
            g = len(answers[i]) - 1
            if g > 0:
                pl = len(prompts[i])
                tok_states.append(np.transpose(tap[:, r, pl:pl + g], (1, 0, 2)))
                tok_req.append(np.full(g, i, np.int32))
                tok_gen.append(np.arange(1, g + 1, dtype=np.int32))
        bar.update(len(idx))
    bar.close()
    empty = np.zeros((0, len(layers), d), np.float16)
    return ProbeFeatures(
        layers=layers, prompt_states=prompt_states,
        token_states=np.concatenate(tok_states) if tok_states else empty,
        token_request=np.concatenate(tok_req) if tok_req else np.zeros(0, np.int32),
        token_generated=np.concatenate(tok_gen) if tok_gen else np.zeros(0, np.int32),
        output_lengths=np.asarray([len(a) for a in answers], np.int32),
        prompt_lengths=np.asarray([len(p) for p in prompts], np.int32),
        finished=np.asarray(finished, bool), max_new_tokens=int(max_new_tokens))
