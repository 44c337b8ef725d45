"""Plain-jnp paged attention: the definition of correct for every kernel.

Paged KV layout (shared by all kernels), per layer:
  k_pages, v_pages : [num_kv_heads, num_pages, page_size, head_dim]
  block_tables     : [B, max_pages_per_seq] int32; logical page j of sequence b lives in
                     physical page block_tables[b, j]. Entries past a sequence's pages may be
                     anything in [0, num_pages) (e.g. 0): they are never read for valid positions.
  lengths / q_start / q_lens : [B] int32.
Page 0 is reserved by the engine as a null page (never holds real data).
Token position p of sequence b sits at page block_tables[b, p // page_size], offset p % page_size.

The reference gathers each sequence's pages into a contiguous [B, Hkv, P*page, D] view and runs a
masked softmax in float32. Masked logits use a large finite negative, and rows with nothing to attend
to are zeroed explicitly, so a fully masked row gives 0 rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK = -1e30  # finite: exp(_MASK - max) underflows to 0 without inf - inf = NaN


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter N new tokens [N, Hkv, D] into their slots; slot < 0 means skip (padding)."""
    hkv, num_pages, page_size, d = k_pages.shape
    slots = slot_mapping.astype(jnp.int32)
    # Out-of-range index + mode="drop" discards padding tokens without a branch.
    flat = jnp.where(slots < 0, num_pages * page_size, slots)
    kf = k_pages.reshape(hkv, num_pages * page_size, d)
    vf = v_pages.reshape(hkv, num_pages * page_size, d)
    kf = kf.at[:, flat].set(jnp.swapaxes(k_new, 0, 1).astype(k_pages.dtype), mode="drop")
    vf = vf.at[:, flat].set(jnp.swapaxes(v_new, 0, 1).astype(v_pages.dtype), mode="drop")
    return kf.reshape(k_pages.shape), vf.reshape(v_pages.shape)


def _gather(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[Hkv, Np, S, D] x [B, P] -> [B, Hkv, P*S, D] (each sequence's pages, contiguous)."""
    hkv, _, s, d = pages.shape
    b, p = block_tables.shape
    g = pages[:, block_tables]  # [Hkv, B, P, S, D]
    return jnp.swapaxes(g, 0, 1).reshape(b, hkv, p * s, d)


def _softcap(logits: jax.Array, softcap: float | None) -> jax.Array:
    if softcap is None:
        return logits
    return softcap * jnp.tanh(logits / softcap)


def prefill_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    q_start: jax.Array,
    q_lens: jax.Array,
    block_tables: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """q [B, T, Hq, D]; query i of row b is at position q_start[b]+i (valid if i < q_lens[b]) and
    attends causally to positions 0..q_start[b]+i of the pages. Invalid rows give zeros."""
    b, t, hq, d = q.shape
    hkv = k_pages.shape[0]
    if hq % hkv:
        raise ValueError(f"num q heads {hq} must be a multiple of num kv heads {hkv}")
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    k = _gather(k_pages, block_tables).astype(jnp.float32)  # [B, Hkv, L, D]
    v = _gather(v_pages, block_tables).astype(jnp.float32)
    # Zero V past each row's last attended position: 0 * NaN would leak other sequences' data.
    kv_end = q_start + q_lens  # [B]
    v = jnp.where(jnp.arange(v.shape[2])[None, None, :, None] < kv_end[:, None, None, None], v, 0.0)
    qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bkld->bkgtl", qf, k) * scale
    logits = _softcap(logits, softcap)
    qpos = q_start[:, None] + jnp.arange(t)[None, :]  # [B, T]
    kpos = jnp.arange(k.shape[2])
    valid_q = jnp.arange(t)[None, :] < q_lens[:, None]  # [B, T]
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & valid_q[:, :, None]  # [B, T, L]
    mask = mask[:, None, None]  # [B, 1, 1, T, L]
    logits = jnp.where(mask, logits, _MASK)
    p = jnp.exp(logits - logits.max(-1, keepdims=True))
    p = jnp.where(mask, p, 0.0)
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgtl,bkld->btkgd", p / jnp.where(denom == 0, 1.0, denom), v)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """q [B, Hq, D] attends to positions [0, lengths[b]); lengths 0 gives zeros."""
    lengths = lengths.astype(jnp.int32)
    out = prefill_attention(
        q[:, None],
        k_pages,
        v_pages,
        lengths - 1,
        (lengths > 0).astype(jnp.int32),
        block_tables,
        scale=scale,
        softcap=softcap,
    )
    return out[:, 0]


def rotate_rows(x: jax.Array, rope_rows: jax.Array) -> jax.Array:
    """RoPE (rotate-half) of x [B, ..., D] by rope_rows [B, 2, D] (models.llama.rope_rows: [cos, cos]
    and [-sin, sin] per row): x * cos + x[(i + D/2) % D] * sin, in float32, back in x's dtype."""
    b, d = x.shape[0], x.shape[-1]
    shape = (b,) + (1,) * (x.ndim - 2) + (d,)
    xf = x.astype(jnp.float32)
    cos, sin = rope_rows[:, 0].reshape(shape), rope_rows[:, 1].reshape(shape)
    return (xf * cos + jnp.roll(xf, d // 2, axis=-1) * sin).astype(x.dtype)


def decode_rope_write(qkv: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                      block_tables: jax.Array, slot_mapping: jax.Array, rope_rows: jax.Array, *,
                      scale: float | None = None, softcap: float | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step from the fused projection's raw rows qkv [B, Hkv, G + 2, D] (per kv head: G query
    heads, k, v): rotate q and k, write k and v at slot_mapping [B] (the slot of position lengths - 1;
    < 0 skips), attend to [0, lengths). -> (out [B, Hkv * G, D], k_pages, v_pages)."""
    b, hkv, g2, d = qkv.shape
    g = g2 - 2
    rotated = rotate_rows(qkv[:, :, :g + 1], rope_rows)
    k_pages, v_pages = write_kv(k_pages, v_pages, rotated[:, :, g], qkv[:, :, g + 1], slot_mapping)
    out = decode_attention(rotated[:, :, :g].reshape(b, hkv * g, d), k_pages, v_pages, lengths, block_tables,
                           scale=scale, softcap=softcap)
    return out, k_pages, v_pages
