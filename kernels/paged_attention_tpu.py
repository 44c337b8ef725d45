"""Paged attention for the Pallas TPU (Mosaic) backend: one kernel for decode and prefill.

Same algorithm and query packing as the GPU kernel (kernels/layout.py: GQA rows per kv head), but
pages come in through the pipeline rather than in-kernel gathers, which Mosaic lacks: the block
tables, q_start and q_lens are scalar-prefetched into SMEM and the K/V BlockSpecs' index maps look up
the physical page for grid step j. The last grid axis walks a sequence's pages ("arbitrary": it
carries the online-softmax state in VMEM scratch). Steps past the last needed page repeat that
page's block index, so the pipeline issues no new DMA for them, and their compute is skipped: no
page outside the sequence's range is ever read.

On CPU this runs under Pallas' TPU interpret mode (`interpret=True` -> pltpu.InterpretParams()).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .layout import PackedQ, check_inputs, pack_queries, unpack_output

_NEG = -1e30


def _kv_end(qs_ref, ql_ref, b, tb, block_t: int):
    """One past the last key position that query block tb of sequence b attends to (0: none)."""
    q_start, q_len = qs_ref[b], ql_ref[b]
    end = jnp.maximum(q_start + jnp.minimum((tb + 1) * block_t, q_len), 0)
    return jnp.where(tb * block_t < q_len, end, 0)


def _kernel(qs_ref, ql_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *, g: int,
            block_t: int, scale: float, softcap: float | None):
    b, tb, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    rows_n, _ = q_ref.shape
    page_size = k_ref.shape[0]
    kv_end = _kv_end(qs_ref, ql_ref, b, tb, block_t)
    # Row r holds query token r // g of the block; built from compares (no vector int division).
    rows = jax.lax.broadcasted_iota(jnp.int32, (rows_n, page_size), 0)
    t_local = sum(((rows >= i * g).astype(jnp.int32) for i in range(1, block_t)), jnp.zeros_like(rows))
    t = tb * block_t + t_local
    row_ok = (rows < block_t * g) & (t < ql_ref[b])
    qpos = qs_ref[b] + t

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j * page_size < kv_end)
    def _step():
        kpos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (rows_n, page_size), 1)
        mask = row_ok & (kpos <= qpos) & (kpos < kv_end)
        vpos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, v_ref.shape, 0)
        v = jnp.where(vpos < kv_end, v_ref[...], jnp.zeros_like(v_ref[...]))  # 0 * NaN would leak
        logits = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        logits = jnp.where(mask, logits, _NEG)
        m_prev = m_scr[...][:, :1]
        m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(logits - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_scr[...][:, :1] + p.sum(axis=1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        acc_scr[...] = alpha * acc_scr[...] + pv
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        den = l_scr[...][:, :1]
        o_ref[...] = (acc_scr[...] / jnp.where(den == 0.0, 1.0, den)).astype(o_ref.dtype)


def paged_attention_tpu(pq: PackedQ, k_pages, v_pages, block_tables, *, scale: float,
                        softcap: float | None, interpret: bool):
    b, hkv, ntb, rows, d = pq.q.shape
    _, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    bt = jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1).reshape(-1)

    def kv_map(i, h, tb, j, qs, ql, bt):
        last = jnp.maximum(pl.cdiv(_kv_end(qs, ql, i, tb, pq.block_t), page_size) - 1, 0)
        return h, bt[i * max_pages + jnp.minimum(j, last)], 0, 0

    q_spec = pl.BlockSpec((None, None, None, rows, d), lambda i, h, tb, j, *_: (i, h, tb, 0, 0))
    kv_spec = pl.BlockSpec((None, None, page_size, d), kv_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, hkv, ntb, max_pages),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((rows, 128), jnp.float32), pltpu.VMEM((rows, 128), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    kernel = functools.partial(_kernel, g=pq.g, block_t=pq.block_t, scale=scale, softcap=softcap)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(pq.q.shape, pq.q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jtrail_paged_attention_tpu",
    )(pq.q_start, pq.q_lens, bt, pq.q, k_pages, v_pages)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "interpret"))
def decode_attention_tpu(q, k_pages, v_pages, lengths, block_tables, *, scale=None, softcap=None,
                         interpret=False):
    """Decode on TPU: q [B, Hq, D] -> [B, Hq, D] (see reference.decode_attention)."""
    check_inputs(q[:, None], k_pages, v_pages, block_tables)
    lengths = lengths.astype(jnp.int32)
    pq = pack_queries(q[:, None], k_pages.shape[0], lengths - 1, (lengths > 0).astype(jnp.int32),
                      block_t=1, min_rows=8)
    out = paged_attention_tpu(pq, k_pages, v_pages, block_tables, interpret=interpret,
                              scale=q.shape[-1] ** -0.5 if scale is None else scale, softcap=softcap)
    return unpack_output(out, pq)[:, 0]


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "block_t", "interpret"))
def prefill_attention_tpu(q, k_pages, v_pages, q_start, q_lens, block_tables, *, scale=None,
                          softcap=None, block_t=None, interpret=False):
    """Prefill on TPU: q [B, T, Hq, D] -> [B, T, Hq, D] (see reference.prefill_attention)."""
    check_inputs(q, k_pages, v_pages, block_tables)
    g = q.shape[2] // k_pages.shape[0]
    bt_tok = block_t or max(1, min(q.shape[1], 128 // g))  # ~128 packed rows: one MXU tile
    pq = pack_queries(q, k_pages.shape[0], q_start, q_lens, block_t=bt_tok, min_rows=8)
    out = paged_attention_tpu(pq, k_pages, v_pages, block_tables, interpret=interpret,
                              scale=q.shape[-1] ** -0.5 if scale is None else scale, softcap=softcap)
    return unpack_output(out, pq)
