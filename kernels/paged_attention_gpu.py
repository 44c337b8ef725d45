"""Paged attention for the Pallas GPU (Triton) backend: one kernel for decode and prefill.

Layout: see kernels/reference.py. Each program handles one (sequence, kv head, query block,
context split). Its queries are packed as rows: row r = t_local * G + g for the G query heads that
share the kv head (GQA packing), so each K/V page is read from HBM once per kv head, not G times.
The packing is done by the kernel's own loads (a gather from q viewed as [B, T, Hkv, G, D], a free
reshape) and stores, so no transpose or pad of q runs outside the kernel. Decode is the case of one
query token per sequence: its G rows are padded in registers to the 16-row tensor-core minimum.

The program loops over its pages `pages_per_block` at a time (gathering them through the block
table, e.g. 4 pages of 16 = 64 tokens per step) with an online softmax. The block-table entries of
the next step are loaded one step ahead, so a step waits for one memory round trip, not two. With
num_splits > 1 the context is split across programs (split-K, for long contexts and small batches)
and a tiny jnp epilogue merges the partial (o, m, den) -- flash-decoding. Splits take the blocks
round-robin (split s: blocks s, s + S, ...; `strided_splits`), so a table far wider than the sequence
(a serving engine's is max_model_len wide) still gives every split work.

No program reads K/V at positions it may not attend to: loads of pages past the sequence's end
are masked off (V is zeroed, logits forced to -inf) so pages of other sequences, NaN or not,
cannot leak in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # jax <= 0.11 names the Triton backend module `triton`
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - future jax
    from jax.experimental.pallas import gpu as plgpu

from .layout import check_inputs, merge_splits

_NEG = -1e30
_LOG2E = 1.4426950408889634


def _kernel(qstart_ref, qlen_ref, bt_ref, *refs, g: int, rows_n: int, ntb: int, ppb: int, num_splits: int,
            pages_per_split: int, strided: bool, scale: float, softcap: float | None, rope: bool):
    if rope:  # decode of the fused projection's raw rows: RoPE, the new token's K/V write and attention
        slot_ref, rot_ref, q_ref, k_ref, v_ref, o_ref, *ml_refs, k_out, v_out = refs
    else:
        q_ref, k_ref, v_ref, o_ref, *ml_refs = refs
    b = pl.program_id(0)
    i = pl.program_id(2)
    tb, s = ntb - 1 - i // num_splits, i % num_splits  # causal prefill: longest query blocks first
    block_t, _, d = q_ref.shape
    num_pages, page_size = k_ref.shape[:2]
    max_pages = bt_ref.shape[1]
    q_start, q_len = qstart_ref[b], qlen_ref[b]
    blk = ppb * page_size

    rows = jnp.arange(rows_n, dtype=jnp.int32)
    in_blk = rows < block_t * g  # rows past block_t * g are tensor-core padding
    t = tb * block_t + rows // g
    row_ok = in_blk & (t < q_len)
    qpos = jnp.where(row_ok, q_start + t, -1)  # a row attends to keys at positions <= qpos
    # Keys this query block needs: [0, kv_end), in blocks of ppb pages. Blocks ending at or before the
    # first row's position + 1 are visible to every row: they skip all masking (the common case: all
    # but the last block in decode and below the diagonal).
    has_rows = tb * block_t < q_len
    kv_end = jnp.where(has_rows, jnp.maximum(q_start + jnp.minimum((tb + 1) * block_t, q_len), 0), 0)
    n_all = jnp.minimum(pl.cdiv(kv_end, blk), pl.cdiv(max_pages, ppb))  # never past the table's end
    n_all_full = jnp.minimum(q_start + tb * block_t + 1, kv_end) // blk
    if strided:  # split s owns blocks s, s + S, s + 2S, ...: every split has work whatever the length
        first, stride = s, num_splits
        n_blocks = pl.cdiv(jnp.maximum(n_all - s, 0), num_splits)
        n_full = jnp.minimum(pl.cdiv(jnp.maximum(n_all_full - s, 0), num_splits), n_blocks)
    else:  # split s owns a contiguous range of the table's blocks (empty past the sequence's end)
        first, stride = s * (pages_per_split // ppb), 1
        n_blocks = jnp.clip(n_all - first, 0, pages_per_split // ppb)
        n_full = jnp.clip(n_all_full - first, 0, n_blocks)
    t_idx, g_idx = jnp.minimum(rows // g, block_t - 1), rows % g
    q = q_ref[t_idx, g_idx]  # [rows_n, d]; padding rows repeat a real one and are never stored
    qk_scale = scale * _LOG2E if softcap is None else scale  # exp2 domain, folded into one multiply
    if rope:  # rotate q and the new k here (rope_rows: x * [cos, cos] + x[(i + D/2) % D] * [-sin, sin])
        cols = jnp.arange(d, dtype=jnp.int32)
        half = (cols + d // 2) % d
        cos, sin = rot_ref[b, 0, :], rot_ref[b, 1, :]
        q_half = plgpu.load(q_ref.at[t_idx[:, None], g_idx[:, None], half[None, :]])
        q = (q.astype(jnp.float32) * cos[None, :] + q_half.astype(jnp.float32) * sin[None, :]).astype(q.dtype)
        k_new = q_ref[0, g, :]
        k_new = (k_new.astype(jnp.float32) * cos
                 + plgpu.load(q_ref.at[0, g, half]).astype(jnp.float32) * sin).astype(k_new.dtype)
        v_new = q_ref[0, g + 1, :]

    def fetch(page0):  # physical pages of the block at logical page0 (clamped: always in bounds)
        cols = jnp.minimum(page0 + jnp.arange(ppb, dtype=jnp.int32), max_pages - 1)
        return jnp.clip(bt_ref[b, cols], 0, num_pages - 1)

    def step(j, carry, masked: bool):
        o, m, den, idx = carry
        page0 = (first + j * stride) * ppb
        # (Also prefetching K/V one block ahead in registers ran 2x slower: spills.)
        k, v = k_ref[idx].reshape(blk, d), v_ref[idx].reshape(blk, d)
        nxt = fetch(page0 + stride * ppb)
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
        return alpha[:, None] * o + pv, m_new, den, nxt

    carry = (jnp.zeros((rows_n, d), jnp.float32), jnp.full((rows_n,), _NEG, jnp.float32),
             jnp.zeros((rows_n,), jnp.float32), fetch(first * ppb))
    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    o, m, den, _ = jax.lax.fori_loop(n_full, n_blocks, functools.partial(step, masked=True), carry)
    if rope:  # the new token (position q_start + 1, not yet in the pages): split 0 adds it from registers
        take = row_ok & (s == 0)
        logit = jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1) * qk_scale
        if softcap is not None:
            logit = (softcap * _LOG2E) * jnp.tanh(logit / softcap)
        logit = jnp.where(take, logit, _NEG)
        m_new = jnp.maximum(m, logit)
        p = jnp.where(take, jnp.exp2(logit - m_new), 0.0)
        alpha = jnp.exp2(m - m_new)
        den = alpha * den + p
        # p rounded to V's dtype as the blocks' p @ V rounds it (bf16 products are exact in f32)
        p_v = p.astype(v_new.dtype).astype(jnp.float32)
        o = alpha[:, None] * o + p_v[:, None] * v_new.astype(jnp.float32)[None, :]
        m = m_new
        slot = slot_ref[b]

        @pl.when((s == 0) & (slot >= 0) & (slot < num_pages * page_size))
        def _():  # no program reads this slot unmasked: every one attends to positions <= q_start only
            k_out[slot // page_size, slot % page_size, :] = k_new.astype(k_out.dtype)
            v_out[slot // page_size, slot % page_size, :] = v_new.astype(v_out.dtype)
    # Rows that are padding or past q_len may have summed unmasked blocks: zero them here.
    den = jnp.where(row_ok, den, 0.0)
    o = jnp.where(row_ok[:, None], o, 0.0)

    def store(ref, x):  # unpack rows to [block_t, G(, D)]; padding rows aim out of bounds, masked
        t_st = jnp.where(in_blk, rows // g, block_t)
        if x.ndim == 1:
            plgpu.store(ref.at[t_st, g_idx], x, mask=in_blk)
        else:
            cols = jnp.arange(d, dtype=jnp.int32)[None, :]
            plgpu.store(ref.at[t_st[:, None], g_idx[:, None], cols], x,
                        mask=jnp.broadcast_to(in_blk[:, None], x.shape))

    if num_splits == 1:
        store(o_ref, (o / jnp.where(den == 0.0, 1.0, den)[:, None]).astype(o_ref.dtype))
    else:
        store(o_ref, o)
        store(ml_refs[0], m)
        store(ml_refs[1], den)


def paged_attention_gpu(qg, k_pages, v_pages, q_start, q_lens, block_tables, *, g: int, block_t: int,
                        scale: float, softcap: float | None, pages_per_block: int, num_splits: int,
                        num_warps: int, num_stages: int, interpret: bool, strided_splits: bool = True,
                        rope_rows=None, slot_mapping=None):
    """qg [B, T, Hkv, Gq, D] -> [B, T, Hkv * g, D] (see reference.prefill_attention): the queries of kv
    head h are qg[:, :, h, :g]. Gq = g is q reshaped (free); Gq = g + 2 is the fused qkv projection's
    output (its k and v rows follow each head's queries), read in place.

    With `rope_rows` [B, 2, D] and `slot_mapping` [B] (decode of raw qkv rows, T = 1, Gq = g + 2): the
    kernel rotates q and k (rope_rows), writes the new k and v at slot_mapping and attends to the
    pages' positions <= q_start plus the new token; returns (out, k_pages, v_pages), the pages updated
    in place (aliased)."""
    b, t, hkv, gq, d = qg.shape
    rope = rope_rows is not None
    _, num_pages, page_size, _ = k_pages.shape
    ppb, ns = pages_per_block, num_splits
    ntb = pl.cdiv(t, block_t)
    if ntb * block_t != t:
        qg = jnp.pad(qg, ((0, 0), (0, ntb * block_t - t), (0, 0), (0, 0), (0, 0)))
    out5 = (b, ntb * block_t, hkv, g, d)
    # Split boundaries fall on block boundaries.
    pages_per_split = pl.cdiv(pl.cdiv(block_tables.shape[1], ns), ppb) * ppb
    kernel = functools.partial(
        _kernel, g=g, rows_n=max(16, pl.next_power_of_2(block_t * g)), ntb=ntb, ppb=ppb,
        num_splits=ns, pages_per_split=pages_per_split, strided=strided_splits, scale=scale,
        softcap=softcap, rope=rope)
    # Scalars and block tables: the whole (small) array in every program, indexed by program id.
    whole1 = pl.BlockSpec((b,), lambda i, h, j: (0,))
    whole2 = pl.BlockSpec(block_tables.shape, lambda i, h, j: (0, 0))
    kv_spec = pl.BlockSpec((None, num_pages, page_size, d), lambda i, h, j: (h, 0, 0, 0))
    q_spec = pl.BlockSpec((None, block_t, None, gq, d),
                          lambda i, h, j: (i, ntb - 1 - j // ns, h, 0, 0))
    if ns == 1:
        out_shape = jax.ShapeDtypeStruct(out5, qg.dtype)
        out_specs = pl.BlockSpec((None, block_t, None, g, d), lambda i, h, j: (i, ntb - 1 - j // ns, h, 0, 0))
    else:
        ospec = pl.BlockSpec((None, None, block_t, None, g, d),
                             lambda i, h, j: (j % ns, i, ntb - 1 - j // ns, h, 0, 0))
        mspec = pl.BlockSpec((None, None, block_t, None, g),
                             lambda i, h, j: (j % ns, i, ntb - 1 - j // ns, h, 0))
        out_shape = (jax.ShapeDtypeStruct((ns, *out5), jnp.float32),
                     jax.ShapeDtypeStruct((ns, *out5[:-1]), jnp.float32),
                     jax.ShapeDtypeStruct((ns, *out5[:-1]), jnp.float32))
        out_specs = (ospec, mspec, mspec)
    scalars = (q_start.astype(jnp.int32), q_lens.astype(jnp.int32), block_tables.astype(jnp.int32))
    if rope:
        if t != 1 or gq != g + 2:
            raise ValueError(f"rope_rows needs decode rows of the fused projection, got qg {qg.shape}")
        n_out = 1 if ns == 1 else 3
        pages = jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)
        out = pl.pallas_call(
            kernel,
            grid=(b, hkv, ns),
            in_specs=[whole1, whole1, whole2, whole1, pl.BlockSpec((b, 2, d), lambda i, h, j: (0, 0, 0)),
                      q_spec, kv_spec, kv_spec],
            out_specs=(*(out_specs if ns > 1 else (out_specs,)), kv_spec, kv_spec),
            out_shape=(*(out_shape if ns > 1 else (out_shape,)), pages, pages),
            input_output_aliases={6: n_out, 7: n_out + 1},
            interpret=interpret,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            name="jtrail_paged_attention_rope_write",
        )(*scalars, slot_mapping.astype(jnp.int32), rope_rows.astype(jnp.float32), qg, k_pages, v_pages)
        out, (k_pages, v_pages) = (out[0] if ns == 1 else out[:3]), out[n_out:]
        if ns > 1:
            out = merge_splits(*out).astype(qg.dtype)
        return out.reshape(b, -1, hkv * g, d)[:, :t], k_pages, v_pages
    out = pl.pallas_call(
        kernel,
        grid=(b, hkv, ntb * ns),
        in_specs=[whole1, whole1, whole2, q_spec, kv_spec, kv_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jtrail_paged_attention",
    )(*scalars, qg, k_pages, v_pages)
    if ns > 1:
        out = merge_splits(*out).astype(qg.dtype)
    return out.reshape(b, -1, hkv * g, d)[:, :t]


def _auto_splits(batch: int, hkv: int, max_pages: int, page_size: int) -> int:
    """Split-K (strided: every split has work at any length) while the grid has fewer than 1,024
    programs (~8 per SM of a 132-SM H100/H200) and either each split keeps >= 512 table tokens (long
    contexts; KERNEL_NOTES: b32/2k 4 splits, b64/512 and b128/1k unsplit, b64/512 9% slower with 2) or
    the grid is small (< 512 programs, at most 4 splits, >= 128 tokens each: latency-bound, as SmolLM2's
    3 kv heads at b32-b128; results/decode_splits.json: b32/512 4 splits 1.54-1.75x, b128/512 2 splits
    1.24-1.34x the contiguous rule's time)."""
    splits = 1
    while splits < 16 and batch * hkv * splits < 1024:
        tokens = max_pages * page_size // (splits * 2)  # per split after doubling
        small_grid = splits < 4 and batch * hkv * splits < 512 and tokens >= 128
        if not (small_grid or tokens >= 512):
            break
        splits *= 2
    return splits


_STATIC = ("scale", "softcap", "pages_per_block", "num_splits", "num_warps", "num_stages",
           "interpret", "strided_splits")


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention_pallas(q, k_pages, v_pages, lengths, block_tables, *, scale=None,
                            softcap=None, pages_per_block=None, num_splits=None, num_warps=None,
                            num_stages=1, interpret=False, strided_splits=True):
    """Decode: q [B, Hq, D] -> [B, Hq, D] (see reference.decode_attention)."""
    check_inputs(q[:, None], k_pages, v_pages, block_tables)
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    return _decode(q.reshape(b, hkv, hq // hkv, d), hq // hkv, k_pages, v_pages, lengths, block_tables,
                   scale=scale, softcap=softcap, pages_per_block=pages_per_block, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                   strided_splits=strided_splits)


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention_from_qkv_pallas(qkv, k_pages, v_pages, lengths, block_tables, *, scale=None,
                                     softcap=None, pages_per_block=None, num_splits=None,
                                     num_warps=None, num_stages=1, interpret=False,
                                     strided_splits=True):
    """Decode with the queries read in place from the fused projection: qkv [B, Hkv, G + 2, D]
    (per kv head its G query heads, then k, then v) -> [B, Hkv * G, D]."""
    b, hkv, g2, d = qkv.shape
    if g2 < 3:
        raise ValueError(f"qkv must be [B, Hkv, G + 2, D], got {qkv.shape}")
    check_inputs(jax.ShapeDtypeStruct((b, 1, hkv * (g2 - 2), d), qkv.dtype), k_pages, v_pages, block_tables)
    return _decode(qkv, g2 - 2, k_pages, v_pages, lengths, block_tables, scale=scale, softcap=softcap,
                   pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret, strided_splits=strided_splits)


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_rope_write_pallas(qkv, k_pages, v_pages, lengths, block_tables, slot_mapping, rope_rows, *,
                             scale=None, softcap=None, pages_per_block=None, num_splits=None,
                             num_warps=None, num_stages=1, interpret=False, strided_splits=True):
    """One decode step's attention from the fused projection's raw (unrotated) rows qkv [B, Hkv, G + 2,
    D], in one kernel: RoPE on q and k (rope_rows [B, 2, D]: models.llama.rope_rows), the new k and v
    written at slot_mapping [B] (< 0: skip), attention over positions [0, lengths) of which the last
    is the new token. -> (out [B, Hkv * G, D], k_pages, v_pages). See reference.decode_rope_write."""
    b, hkv, g2, d = qkv.shape
    if g2 < 3:
        raise ValueError(f"qkv must be [B, Hkv, G + 2, D], got {qkv.shape}")
    check_inputs(jax.ShapeDtypeStruct((b, 1, hkv * (g2 - 2), d), qkv.dtype), k_pages, v_pages, block_tables)
    if rope_rows.shape != (b, 2, d) or slot_mapping.shape != (b,):
        raise ValueError(f"rope_rows must be [{b}, 2, {d}] and slot_mapping [{b}], got {rope_rows.shape} "
                         f"and {slot_mapping.shape}")
    return _decode(qkv, g2 - 2, k_pages, v_pages, lengths, block_tables, scale=scale, softcap=softcap,
                   pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret, strided_splits=strided_splits,
                   rope_rows=rope_rows, slot_mapping=slot_mapping)


def _decode(qg, g: int, k_pages, v_pages, lengths, block_tables, *, scale, softcap, pages_per_block,
            num_splits, num_warps, num_stages, interpret, strided_splits, rope_rows=None,
            slot_mapping=None):
    """qg [B, Hkv, Gq, D] (queries: the first g rows per kv head) -> [B, Hkv * g, D]; with rope_rows,
    (out, k_pages, v_pages) of decode_rope_write_pallas."""
    lengths = lengths.astype(jnp.int32)
    hkv, _, page_size, d = k_pages.shape
    max_pages = block_tables.shape[1]
    splits = num_splits or _auto_splits(qg.shape[0], hkv, max_pages, page_size)
    # KERNEL_NOTES run 6 (stages 1; 2 stages 1.5x slower): unsplit tables < 1024 tokens best at 32 tokens,
    # 1 warp (b64/512: 2.18x JAX vs 1.99x); split or longer (b128/1k is unsplit) best at 64 tokens, 2 warps.
    short = splits == 1 and max_pages * page_size < 1024
    tokens_per_step, warps = (32, 1) if short else (64, 2)
    ppb = min(pages_per_block or max(1, tokens_per_step // page_size), pl.next_power_of_2(max_pages))
    # with the new token from registers the pages hold positions <= lengths - 2: attend to those
    q_start = lengths - (1 if rope_rows is None else 2)
    out = paged_attention_gpu(qg[:, None], k_pages, v_pages, q_start, (lengths > 0).astype(jnp.int32),
                              block_tables, g=g, block_t=1, scale=d**-0.5 if scale is None else scale,
                              softcap=softcap, pages_per_block=ppb, num_splits=splits,
                              num_warps=num_warps or warps, num_stages=num_stages,
                              interpret=interpret, strided_splits=strided_splits, rope_rows=rope_rows,
                              slot_mapping=slot_mapping)
    if rope_rows is not None:
        return out[0][:, 0], out[1], out[2]
    return out[:, 0]


@functools.partial(jax.jit, static_argnames=("block_t",) + _STATIC)
def prefill_attention_pallas_gpu(q, k_pages, v_pages, q_start, q_lens, block_tables, *,
                                 scale=None, softcap=None, block_t=None, pages_per_block=None,
                                 num_splits=1, num_warps=4, num_stages=2, interpret=False,
                                 strided_splits=True):
    """Prefill: q [B, T, Hq, D] -> [B, T, Hq, D] (see reference.prefill_attention)."""
    check_inputs(q, k_pages, v_pages, block_tables)
    hkv, _, page_size, d = k_pages.shape
    b, t, hq, _ = q.shape
    g = hq // hkv
    # KERNEL_NOTES run 6: ~128 packed rows x 64 keys, 4 warps, 2 stages: 1.40x cuDNN (64 rows: 1.62x).
    bt_tok = block_t or max(1, min(pl.next_power_of_2(t), 128 // pl.next_power_of_2(g)))
    ppb = min(pages_per_block or max(1, 64 // page_size), pl.next_power_of_2(block_tables.shape[1]))
    return paged_attention_gpu(q.reshape(b, t, hkv, g, d), k_pages, v_pages, q_start.astype(jnp.int32),
                               q_lens.astype(jnp.int32), block_tables, g=g, block_t=bt_tok,
                               scale=d**-0.5 if scale is None else scale,
                               softcap=softcap, pages_per_block=ppb, num_splits=num_splits,
                               num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                               strided_splits=strided_splits)
