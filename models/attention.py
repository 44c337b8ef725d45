"""Attention functions the decoder plugs in.

The model computes q, k, v (RoPE applied) and hands them, with the layer's cache and a metadata pytree,
to an attention function:

    attn_fn(q, k, v, layer_cache, meta) -> (out, new_layer_cache)

    q:  [B, T, Hq, D]      k, v: [B, T, Hkv, D]      out: [B, T, Hq, D]

The softmax scale (1/sqrt(D)) is applied inside. An attention fn may also take the layer's q, k and v
in the one array the fused projection makes, [B, T, Hkv, G + 2, D] (per kv head: its G query heads,
then k, then v; RoPE applied): it sets an attribute `packed_qkv(qkv, layer_cache, meta)` and the
model calls that instead. The GPU kernels read q, k and v in place there; three separate arrays cost
XLA three copies a layer (a slice fusion each), about a fifth of a small model's decode step.
It may also set `rotary_qkv(qkv, positions, inv_freq, layer_cache, meta)`, taking the same array before
RoPE (the kernel rotates q and k itself: one fusion a layer fewer); it returns None for a call it does
not take, and the model then rotates and calls `packed_qkv`.

Three implementations live here: no cache (one
causal pass, for parity tests and teacher-forced probe features), and a contiguous per-sequence cache
(simple batched generation). The paged-cache version lives in `jtrail.serving` on top of the Pallas
kernels, so the model never knows how memory is laid out.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: Any, meta: Any
                 ) -> tuple[jax.Array, Any]: ...


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,T,Hq,D], k/v [B,S,Hkv,D], mask [B,T,S] (True = attend). Computes in f32."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d).astype(jnp.float32) * (d ** -0.5)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32))
    scores = jnp.where(mask[:, None, None, :, :], scores, -jnp.inf)
    # Rows with nothing to attend to (padding) give zeros rather than NaN.
    scores_max = jnp.max(scores, axis=-1, keepdims=True)
    scores_max = jnp.where(jnp.isfinite(scores_max), scores_max, 0.0)
    p = jnp.exp(scores - scores_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


def unpack_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, T, Hkv, G + 2, D] -> q [B, T, Hkv * G, D], k and v [B, T, Hkv, D]."""
    b, t, hkv, g2, d = qkv.shape
    return qkv[:, :, :, :g2 - 2].reshape(b, t, hkv * (g2 - 2), d), qkv[:, :, :, g2 - 2], qkv[:, :, :, g2 - 1]


class DenseMeta(NamedTuple):
    """Per-token validity for the cache-free pass: lengths [B] (tokens beyond are padding)."""

    lengths: jax.Array


def dense_causal_attention(q, k, v, layer_cache, meta: DenseMeta | None):
    """Causal attention over the given tokens only; no cache."""
    t = q.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if meta is not None:
        valid = jnp.arange(t)[None, :] < meta.lengths[:, None]
        causal = causal & valid[:, None, :]
    return _softmax_attention(q, k, v, causal), layer_cache


class ContiguousMeta(NamedTuple):
    """positions [B, T]: absolute position of each new token (-1 marks padding, not written)."""

    positions: jax.Array


def contiguous_cache_attention(q, k, v, layer_cache, meta: ContiguousMeta):
    """Write k/v at their positions in a [B, S, Hkv, D] cache, then attend to positions <= own."""
    k_cache, v_cache = layer_cache
    b, t = meta.positions.shape
    s = k_cache.shape[1]
    pos = meta.positions
    # Padding tokens are routed to an out-of-range index and dropped by the scatter.
    write_pos = jnp.where(pos >= 0, pos, s)
    bidx = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    k_cache = k_cache.at[bidx, write_pos].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[bidx, write_pos].set(v.astype(v_cache.dtype), mode="drop")
    mask = jnp.arange(s)[None, None, :] <= pos[:, :, None]
    out = _softmax_attention(q, k_cache, v_cache, mask)
    return out, (k_cache, v_cache)


def init_contiguous_cache(n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                          dtype=jnp.float32) -> list[tuple[jax.Array, jax.Array]]:
    shape = (batch, max_len, n_kv_heads, head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(n_layers)]
