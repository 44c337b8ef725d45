"""Paged attention for the Pallas GPU (Triton) backend: one kernel for decode and prefill.

Layout: see kernels/reference.py. Each program handles one (sequence, kv head, query block,
context split). Its queries are packed as rows: row r = t_local * G + g for the G query heads that
share the kv head (GQA packing), so each K/V page is read from HBM once per kv head, not G times.
Decode is the case of one query token per sequence (query block of 1 token, position length-1).

The program loops over its pages `pages_per_block` at a time (gathering them through the block
table, e.g. 8 pages of 16 = 128 tokens per step) with an online softmax. With num_splits > 1 the
context is split across programs (split-K, for long contexts and small batches) and a tiny jnp
epilogue merges the partial (o, m, den) -- flash-decoding.

No program reads K/V at positions it may not attend to: loads of pages past the sequence's end
are masked off (V is zeroed, logits forced to -inf) so pages of other sequences, NaN or not,
cannot leak in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .layout import PackedQ, check_inputs, merge_splits, pack_queries, unpack_output

_NEG = -1e30
_LOG2E = 1.4426950408889634


def _kernel(qstart_ref, qlen_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, *ml_refs, g: int,
            block_t: int, ppb: int, page_size: int, num_splits: int, pages_per_split: int,
            scale: float, softcap: float | None, mask_all: bool):
    b = pl.program_id(0)
    i = pl.program_id(2)
    tb, s = i // num_splits, i % num_splits
    rows_n, d = q_ref.shape
    num_pages = k_ref.shape[0]
    q_start, q_len = qstart_ref[b], qlen_ref[b]
    blk = ppb * page_size

    rows = jnp.arange(rows_n, dtype=jnp.int32)
    t = tb * block_t + rows // g
    row_ok = (rows < block_t * g) & (t < q_len)
    qpos = jnp.where(row_ok, q_start + t, -1)  # a row attends to keys at positions <= qpos
    # Keys this query block needs: [0, kv_end); this split owns pages [p_lo, p_hi).
    has_rows = tb * block_t < q_len
    kv_end = jnp.where(has_rows, jnp.maximum(q_start + jnp.minimum((tb + 1) * block_t, q_len), 0), 0)
    p_lo = s * pages_per_split
    p_hi = jnp.minimum(p_lo + pages_per_split, pl.cdiv(kv_end, page_size))
    n_blocks = pl.cdiv(jnp.maximum(p_hi - p_lo, 0), ppb)
    # Blocks ending at or before the first row's position + 1 are visible to every row: they skip
    # all masking (the common case: all but the last block in decode and below the diagonal).
    full_end = jnp.minimum(q_start + tb * block_t + 1, kv_end)
    n_full = 0 if mask_all else jnp.clip(full_end // blk - p_lo // ppb, 0, n_blocks)
    q = q_ref[...]
    qk_scale = scale * _LOG2E if softcap is None else scale  # exp2 domain, folded into one multiply

    def step(j, carry, masked: bool):
        o, m, den = carry
        page0 = p_lo + j * ppb
        idx = jnp.clip(bt_ref[b, pl.ds(page0, ppb)], 0, num_pages - 1)  # garbage entries stay in bounds
        k = k_ref[idx].reshape(blk, d)
        v = v_ref[idx].reshape(blk, d)
        if masked:
            kpos = page0 * page_size + jnp.arange(blk, dtype=jnp.int32)
            kv_ok = kpos < kv_end
            v = jnp.where(kv_ok[:, None], v, jnp.zeros_like(v))  # 0 * NaN would leak: zero it
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * qk_scale
        if softcap is not None:
            logits = (softcap * _LOG2E) * jnp.tanh(logits / softcap)
        if masked:
            mask = (kpos[None, :] <= qpos[:, None]) & kv_ok[None, :]
            logits = jnp.where(mask, logits, _NEG)
        m_new = jnp.maximum(m, logits.max(axis=1))
        p = jnp.exp2(logits - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        den = alpha * den + p.sum(axis=1)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return alpha[:, None] * o + pv, m_new, den

    carry = (jnp.zeros((rows_n, d), jnp.float32), jnp.full((rows_n,), _NEG, jnp.float32),
             jnp.zeros((rows_n,), jnp.float32))
    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    o, m, den = jax.lax.fori_loop(n_full, n_blocks, functools.partial(step, masked=True), carry)
    # Rows that are padding or past q_len may have summed unmasked blocks: zero them here.
    den = jnp.where(row_ok, den, 0.0)
    o = jnp.where(row_ok[:, None], o, 0.0)
    if num_splits == 1:
        o_ref[...] = (o / jnp.where(den == 0.0, 1.0, den)[:, None]).astype(o_ref.dtype)
    else:
        m_ref, l_ref = ml_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = den


def paged_attention_gpu(pq: PackedQ, k_pages, v_pages, block_tables, *, scale: float,
                        softcap: float | None, pages_per_block: int, num_splits: int,
                        num_warps: int, num_stages: int, interpret: bool, mask_all: bool = False):
    """Run the kernel on packed queries; returns output packed like pq.q."""
    try:  # jax <= 0.11 names the Triton backend module `triton`
        from jax.experimental.pallas import triton as plgpu
    except ImportError:  # pragma: no cover - future jax
        from jax.experimental.pallas import gpu as plgpu

    b, hkv, ntb, rows, d = pq.q.shape
    _, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    ppb = pages_per_block
    # Split boundaries fall on block boundaries; pad the table so every block load is in range.
    pages_per_split = pl.cdiv(pl.cdiv(max_pages, num_splits), ppb) * ppb
    padded = pages_per_split * num_splits
    bt = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, padded - max_pages)))
    kernel = functools.partial(
        _kernel, g=pq.g, block_t=pq.block_t, ppb=ppb, page_size=page_size,
        num_splits=num_splits, pages_per_split=pages_per_split, scale=scale, softcap=softcap,
        mask_all=mask_all)
    grid = (b, hkv, ntb * num_splits)
    # Scalars and block tables: the whole (small) array in every program, indexed by program id.
    whole1 = pl.BlockSpec((b,), lambda i, h, j: (0,))
    whole2 = pl.BlockSpec(bt.shape, lambda i, h, j: (0, 0))
    kv_spec = pl.BlockSpec((None, num_pages, page_size, d), lambda i, h, j: (h, 0, 0, 0))
    q_spec = pl.BlockSpec((None, None, None, rows, d), lambda i, h, j: (i, h, j // num_splits, 0, 0))
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct(pq.q.shape, pq.q.dtype)
        out_specs = q_spec
    else:
        ospec = pl.BlockSpec((None, None, None, None, rows, d),
                             lambda i, h, j: (j % num_splits, i, h, j // num_splits, 0, 0))
        mspec = pl.BlockSpec((None, None, None, None, rows),
                             lambda i, h, j: (j % num_splits, i, h, j // num_splits, 0))
        out_shape = (jax.ShapeDtypeStruct((num_splits, *pq.q.shape), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, *pq.q.shape[:-1]), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, *pq.q.shape[:-1]), jnp.float32))
        out_specs = (ospec, mspec, mspec)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole1, whole1, whole2, q_spec, kv_spec, kv_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jtrail_paged_attention",
    )(pq.q_start, pq.q_lens, bt, pq.q, k_pages, v_pages)
    if num_splits == 1:
        return out
    return merge_splits(*out).astype(pq.q.dtype)


def _auto_splits(max_pages: int, page_size: int) -> int:
    """Split-K for long contexts: up to 4 splits of >= 512 tokens (measured best on H200, see
    benchmarks/KERNEL_NOTES.md); short contexts keep one program per (sequence, kv head)."""
    splits = 1
    while splits < 4 and max_pages * page_size // (splits * 2) >= 512:
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "pages_per_block", "num_splits",
                                             "num_warps", "num_stages", "interpret", "mask_all"))
def decode_attention_pallas(q, k_pages, v_pages, lengths, block_tables, *, scale=None,
                            softcap=None, pages_per_block=None, num_splits=None, num_warps=2,
                            num_stages=1, interpret=False, mask_all=False):
    """Decode: q [B, Hq, D] -> [B, Hq, D] (see reference.decode_attention)."""
    check_inputs(q[:, None], k_pages, v_pages, block_tables)
    lengths = lengths.astype(jnp.int32)
    _, num_pages, page_size, d = k_pages.shape
    pq = pack_queries(q[:, None], k_pages.shape[0], lengths - 1, (lengths > 0).astype(jnp.int32),
                      block_t=1)
    # Defaults from the H200 sweep: 64 tokens per step, 2 warps, no smem pipelining (num_stages=1):
    # small programs -> many resident per SM, which hides the gather latency best.
    ppb = pages_per_block or max(1, 64 // page_size)
    ppb = min(ppb, pl.next_power_of_2(block_tables.shape[1]))
    splits = num_splits or _auto_splits(block_tables.shape[1], page_size)
    out = paged_attention_gpu(pq, k_pages, v_pages, block_tables, scale=d**-0.5 if scale is None
                              else scale, softcap=softcap, pages_per_block=ppb, num_splits=splits,
                              num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                              mask_all=mask_all)
    return unpack_output(out, pq)[:, 0]


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "block_t", "pages_per_block",
                                             "num_warps", "num_stages", "interpret"))
def prefill_attention_pallas_gpu(q, k_pages, v_pages, q_start, q_lens, block_tables, *,
                                 scale=None, softcap=None, block_t=None, pages_per_block=None,
                                 num_warps=4, num_stages=1, interpret=False):
    """Prefill: q [B, T, Hq, D] -> [B, T, Hq, D] (see reference.prefill_attention)."""
    check_inputs(q, k_pages, v_pages, block_tables)
    _, num_pages, page_size, d = k_pages.shape
    g = q.shape[2] // k_pages.shape[0]
    # ~64 packed rows per program: big enough for tensor cores, small enough for registers.
    bt_tok = block_t or max(1, min(pl.next_power_of_2(q.shape[1]), 64 // pl.next_power_of_2(g)))
    pq = pack_queries(q, k_pages.shape[0], q_start.astype(jnp.int32), q_lens.astype(jnp.int32),
                      block_t=bt_tok)
    ppb = pages_per_block or max(1, 64 // page_size)
    ppb = min(ppb, pl.next_power_of_2(block_tables.shape[1]))
    out = paged_attention_gpu(pq, k_pages, v_pages, block_tables, scale=d**-0.5 if scale is None
                              else scale, softcap=softcap, pages_per_block=ppb, num_splits=1,
                              num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return unpack_output(out, pq)
