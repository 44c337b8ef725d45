"""Query packing shared by the Pallas kernels (GQA packing) and the split-K merge.

Queries [B, T, Hq, D] become [B, Hkv, nTB, R, D]: for each kv head, a block of `block_t` query
tokens times its G = Hq/Hkv query heads as R rows (row = t_local * G + g, padded with zero rows up
to a power of two >= 16, the smallest tensor-core tile). One program then reads each K/V page once
for all G heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclass(frozen=True)
class PackedQ:
    """Packed queries plus static packing facts (used inside jit only, not a pytree)."""

    q: jax.Array  # [B, Hkv, nTB, R, D]
    q_start: jax.Array  # [B] int32
    q_lens: jax.Array  # [B] int32
    t: int = 1  # original T
    g: int = 1
    block_t: int = 1


def qkv_parts(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fused projection's rows qkv [N, Hkv, G + 2, D] (per kv head: G query heads, then k, then v)
    -> q [N, Hkv * G, D], k and v [N, Hkv, D]: copies, for the paths that do not read it in place."""
    n, hkv, g2, d = qkv.shape
    return qkv[:, :, :g2 - 2].reshape(n, hkv * (g2 - 2), d), qkv[:, :, g2 - 2], qkv[:, :, g2 - 1]


def check_inputs(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array) -> None:
    """Shape checks with clear errors (q is [B, T, Hq, D])."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages/v_pages must be equal [Hkv, pages, page_size, D], got "
                         f"{k_pages.shape} and {v_pages.shape}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, D] (or [B, Hq, D] for decode), got {q.shape}")
    b, _, hq, d = q.shape
    hkv, _, _, dk = k_pages.shape
    if dk != d:
        raise ValueError(f"head_dim mismatch: q {d} vs pages {dk}")
    if hq % hkv:
        raise ValueError(f"num q heads {hq} must be a multiple of num kv heads {hkv}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, max_pages], got {block_tables.shape}")
    if not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise TypeError(f"block_tables must be integer, got {block_tables.dtype}")


def packed_rows(block_t: int, g: int, min_rows: int = 16) -> int:
    return max(min_rows, pl.next_power_of_2(block_t * g))


def pack_queries(q: jax.Array, hkv: int, q_start: jax.Array, q_lens: jax.Array, *, block_t: int,
                 min_rows: int = 16) -> PackedQ:
    b, t, hq, d = q.shape
    g = hq // hkv
    ntb = pl.cdiv(t, block_t)
    rows = packed_rows(block_t, g, min_rows)
    x = jnp.pad(q, ((0, 0), (0, ntb * block_t - t), (0, 0), (0, 0)))
    x = x.reshape(b, ntb, block_t, hkv, g, d).transpose(0, 3, 1, 2, 4, 5)
    x = x.reshape(b, hkv, ntb, block_t * g, d)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, rows - block_t * g), (0, 0)))
    return PackedQ(x, q_start.astype(jnp.int32), q_lens.astype(jnp.int32), t, g, block_t)


def unpack_output(o: jax.Array, pq: PackedQ) -> jax.Array:
    """[B, Hkv, nTB, R, D] -> [B, T, Hq, D]."""
    b, hkv, ntb, _, d = o.shape
    o = o[:, :, :, : pq.block_t * pq.g].reshape(b, hkv, ntb, pq.block_t, pq.g, d)
    o = o.transpose(0, 2, 3, 1, 4, 5).reshape(b, ntb * pq.block_t, hkv * pq.g, d)
    return o[:, : pq.t]


def merge_splits(o: jax.Array, m: jax.Array, den: jax.Array) -> jax.Array:
    """Merge split-K partials: o [S, ...rows, D] unnormalized, m/l [S, ...rows] (m in log2 units)."""
    m_max = m.max(axis=0)
    w = jnp.exp2(m - m_max[None])  # splits with no keys have den = 0 and o = 0
    l_tot = (w * den).sum(axis=0)
    o_tot = (w[..., None] * o).sum(axis=0)
    return o_tot / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]
