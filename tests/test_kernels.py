"""Paged-attention kernels (interpret mode) vs the jnp reference, and the reference vs float64 numpy.

Every KV slot that is not a valid position of its own sequence is NaN, and block-table entries past
a sequence's pages point at random pages (other sequences' or the NaN null page): any read outside
the allowed range shows up as NaN in the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jtrail.kernels import ops, reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # rel-norm error, per METHOD.md


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "NaN/inf in output: a kernel read a slot it must not"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def make_cache(rng, lens, hkv, d, page, dtype, spare_pages=2):
    """NaN-poisoned paged cache holding len(lens) sequences; returns (k, v, tables)."""
    b, p = len(lens), max(1, max(-(-n // page) for n in lens))
    num_pages = 1 + b * p + spare_pages
    k = np.full((hkv, num_pages, page, d), np.nan, np.float32)
    v = k.copy()
    tables = (rng.permutation(num_pages - 1)[: b * p] + 1).reshape(b, p)
    for i, n in enumerate(lens):
        for pos in range(n):
            pg, off = tables[i, pos // page], pos % page
            k[:, pg, off] = rng.standard_normal((hkv, d))
            v[:, pg, off] = rng.standard_normal((hkv, d))
        used = -(-n // page)
        tables[i, used:] = rng.integers(0, num_pages, p - used)  # "may be anything"
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(tables, jnp.int32)


def numpy_prefill(q, k, v, q_start, q_lens, tables, scale, softcap):
    """Float64 loops straight from the definition (independent of reference.py)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    hkv, _, page, _ = k.shape
    out = np.zeros_like(q)
    for i in range(b):
        for j in range(int(q_lens[i])):
            pos = int(q_start[i]) + j
            idx = [(tables[i, x // page], x % page) for x in range(pos + 1)]
            for h in range(hq):
                kv = h // (hq // hkv)
                ks = np.stack([k[kv, pg, o] for pg, o in idx])
                vs = np.stack([v[kv, pg, o] for pg, o in idx])
                s = ks @ q[i, j, h] * scale
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                w = np.exp(s - s.max())
                out[i, j, h] = w @ vs / w.sum()
    return out


def test_reference_matches_float64_definition():
    rng = np.random.default_rng(0)
    lens = [1, 4, 5, 11]
    k, v, tables = make_cache(rng, lens, hkv=2, d=8, page=4, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((4, 3, 6, 8)), jnp.float32)
    q_lens = np.array([1, 3, 2, 3])
    q_start = np.array(lens) - q_lens
    for softcap in (None, 2.0):
        want = numpy_prefill(q, k, v, q_start, q_lens, np.asarray(tables), 8**-0.5, softcap)
        got = reference.prefill_attention(q, k, v, jnp.asarray(q_start), jnp.asarray(q_lens), tables,
                                          softcap=softcap)
        assert rel_err(got, want) < 1e-5
        dec = reference.decode_attention(q[:, 0], k, v, jnp.asarray(lens), tables, softcap=softcap)
        want_dec = numpy_prefill(q[:, :1], k, v, np.array(lens) - 1, np.ones(4), np.asarray(tables),
                                 8**-0.5, softcap)[:, 0]
        assert rel_err(dec, want_dec) < 1e-5


def _lens(page: int) -> st.SearchStrategy:
    return st.lists(st.sampled_from([1, page, page + 1, 3 * page + 2]), min_size=1, max_size=3)


@settings(max_examples=4, deadline=None)
@given(data=st.data(), ratio=st.sampled_from([1, 3, 4, 8]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), d=st.sampled_from([64, 128]),
       softcap=st.sampled_from([None, 5.0]), splits=st.sampled_from([1, 2, 3]),
       strided=st.booleans())
def test_decode_gpu_kernel_interpret(data, ratio, dtype, d, softcap, splits, strided):
    page = 8
    lens = data.draw(_lens(page))
    rng = np.random.default_rng(len(lens) * 1000 + ratio)
    k, v, tables = make_cache(rng, lens, hkv=2, d=d, page=page, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((len(lens), 2 * ratio, d)), dtype)
    lj = jnp.asarray(lens, jnp.int32)
    want = reference.decode_attention(q, k, v, lj, tables, softcap=softcap)
    got = ops.decode_attention(q, k, v, lj, tables, softcap=softcap, impl="pallas_interpret",
                               num_splits=splits, pages_per_block=2, strided_splits=strided)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert rel_err(got, want) < TOL[dtype]


@settings(max_examples=3, deadline=None)
@given(ratio=st.sampled_from([1, 3, 4]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 10_000), block_t=st.sampled_from([2, 4]))
def test_prefill_gpu_kernel_interpret(ratio, dtype, seed, block_t):
    page, t = 4, 6
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 15, 3)
    q_lens = np.minimum(rng.integers(0, t + 1, 3), lens)  # 0 = whole row invalid
    q_start = lens - q_lens
    k, v, tables = make_cache(rng, list(lens), hkv=2, d=64, page=page, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((3, t, 2 * ratio, 64)), dtype)
    args = (q, k, v, jnp.asarray(q_start, jnp.int32), jnp.asarray(q_lens, jnp.int32), tables)
    want = reference.prefill_attention(*args)
    got = ops.prefill_attention(*args, impl="pallas_interpret", block_t=block_t, pages_per_block=2)
    assert rel_err(got, want) < TOL[dtype]
    for i in range(3):  # invalid query rows are exactly zero
        assert not np.asarray(got[i, q_lens[i]:], np.float32).any()


def test_gpu_kernel_interpret_packing_edges():
    """The in-kernel GQA packing: G = 16 (no padding rows), odd split counts, prefill split-K with T
    not a multiple of the query block (the kernel's masked scatter stores must hit each row once)."""
    rng = np.random.default_rng(5)
    lens = [1, 9, 30]
    k, v, tables = make_cache(rng, lens, hkv=2, d=32, page=4, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 32, 32)), jnp.float32)
    lj = jnp.asarray(lens, jnp.int32)
    want = reference.decode_attention(q, k, v, lj, tables)
    for splits, strided in ((1, True), (3, True), (3, False), (8, True)):
        got = ops.decode_attention(q, k, v, lj, tables, impl="pallas_interpret", num_splits=splits,
                                   pages_per_block=1, strided_splits=strided)
        assert rel_err(got, want) < 1e-5, (splits, strided)
    qp = jnp.asarray(rng.standard_normal((3, 11, 6, 32)), jnp.float32)
    q_lens = np.array([1, 9, 11])
    args = (qp, k, v, jnp.asarray(np.array(lens) - q_lens, jnp.int32), jnp.asarray(q_lens, jnp.int32),
            tables)
    for strided in (True, False):
        got = ops.prefill_attention(*args, impl="pallas_interpret", block_t=4, pages_per_block=2,
                                    num_splits=2, strided_splits=strided)
        assert rel_err(got, reference.prefill_attention(*args)) < 1e-5
        assert not np.asarray(got[0, 1:]).any()


def test_gpu_defaults_are_the_measured_variants():
    """KERNEL_NOTES run 6: the defaults must trace to exactly the variants measured (page 16, G=4):
    decode b64/512 = 2 pages/step, 1 warp; long/split decode = 4 pages, 2 warps; prefill b4 x 1024 =
    32 tokens (128 rows) x 4 pages. Tracing only (interpret mode), nothing runs."""
    from jtrail.kernels.paged_attention_gpu import decode_attention_pallas, prefill_attention_pallas_gpu

    def jaxpr(f, args, **kw):
        return str(jax.make_jaxpr(lambda *a: f(*a, interpret=True, **kw))(*args))

    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    for b, ctx, want in ((64, 512, dict(pages_per_block=2, num_warps=1)),
                         (128, 1024, dict(pages_per_block=4, num_warps=2)),
                         (32, 2048, dict(pages_per_block=4, num_warps=2))):
        p = ctx // 16
        args = (sds((b, 32, 128), bf), sds((8, 2 * b * p + 1, 16, 128), bf),
                sds((8, 2 * b * p + 1, 16, 128), bf), sds((b,), jnp.int32), sds((b, p), jnp.int32))
        assert jaxpr(decode_attention_pallas, args) == jaxpr(decode_attention_pallas, args, **want)
    args = (sds((4, 1024, 32, 128), bf), sds((8, 513, 16, 128), bf), sds((8, 513, 16, 128), bf),
            sds((4,), jnp.int32), sds((4,), jnp.int32), sds((4, 64), jnp.int32))
    new = jaxpr(prefill_attention_pallas_gpu, args)
    assert new == jaxpr(prefill_attention_pallas_gpu, args, block_t=32, pages_per_block=4)
    assert new != jaxpr(prefill_attention_pallas_gpu, args, block_t=16, pages_per_block=4)


def test_prefill_gpu_default_tiles_interpret():
    """The default prefill tiles (G=4: 32 tokens = 128 packed rows, 64 keys per step) on ragged
    chunks spanning two query blocks."""
    rng = np.random.default_rng(11)
    lens = [40, 57, 3]
    k, v, tables = make_cache(rng, lens, hkv=2, d=32, page=16, dtype=jnp.float32)
    q_lens = np.array([40, 33, 3])
    qp = jnp.asarray(rng.standard_normal((3, 40, 8, 32)), jnp.float32)
    args = (qp, k, v, jnp.asarray(np.array(lens) - q_lens, jnp.int32), jnp.asarray(q_lens, jnp.int32),
            tables)
    got = ops.prefill_attention(*args, impl="pallas_interpret")
    assert rel_err(got, reference.prefill_attention(*args)) < 1e-5
    assert not np.asarray(got[2, 3:]).any()


def test_write_kv_then_attend():
    rng = np.random.default_rng(1)
    hkv, d, page = 2, 64, 4
    k, v, tables = make_cache(rng, [5, 3], hkv, d, page, jnp.float32)
    k, v = jnp.nan_to_num(k), jnp.nan_to_num(v)
    kn = jnp.asarray(rng.standard_normal((4, hkv, d)), jnp.float32)
    # Token 5 of seq 0 and token 3 of seq 1, plus two padding slots.
    tb = np.asarray(tables)
    slots = jnp.asarray([tb[0, 1] * page + 1, -1, tb[1, 0] * page + 3, -7], jnp.int32)
    want = reference.write_kv(k, v, kn, 2 * kn, slots)
    got = ops.write_kv(jnp.array(k), jnp.array(v), kn, 2 * kn, slots, impl="pallas_interpret")
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert np.array_equal(np.asarray(got[0][:, tb[0, 1], 1]), np.asarray(kn[0]))
    q = jnp.asarray(rng.standard_normal((2, 4, d)), jnp.float32)
    lens = jnp.asarray([6, 4], jnp.int32)
    out = ops.decode_attention(q, *got, lens, tables, impl="pallas_interpret")
    assert rel_err(out, reference.decode_attention(q, *want, lens, tables)) < 1e-5


@pytest.mark.parametrize("impl", ["pallas_interpret", "tpu_interpret", "reference"])
@pytest.mark.parametrize("ratio,splits", [(3, 1), (3, 4), (1, 2)])
def test_from_qkv_reads_the_fused_projection_in_place(impl, ratio, splits):
    """write_kv_from_qkv / decode_attention_from_qkv take qkv [B, Hkv, G + 2, D] whole (G query heads,
    then k, then v per kv head) and give what write_kv / decode_attention give on its slices."""
    rng = np.random.default_rng(11 + ratio)
    hkv, d, page, lens = 2, 64, 8, [9, 1, 26]
    k, v, tables = make_cache(rng, lens, hkv, d, page, jnp.float32)
    tb = np.asarray(tables)  # each sequence's new token (over)writes its last position, n - 1
    slots = jnp.asarray([tb[i, (n - 1) // page] * page + (n - 1) % page for i, n in enumerate(lens)],
                        jnp.int32)
    qkv = jnp.asarray(rng.standard_normal((len(lens), hkv, ratio + 2, d)), jnp.float32)
    lj = jnp.asarray(lens, jnp.int32)
    want_kv = reference.write_kv(k, v, qkv[:, :, ratio], qkv[:, :, ratio + 1], slots)
    got_kv = ops.write_kv_from_qkv(jnp.array(k), jnp.array(v), qkv, slots, impl=impl)
    for w, g in zip(want_kv, got_kv, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    q = qkv[:, :, :ratio].reshape(len(lens), hkv * ratio, d)
    want = reference.decode_attention(q, *want_kv, lj, tables)
    tuning = {"num_splits": splits} if impl == "pallas_interpret" else {}
    got = ops.decode_attention_from_qkv(qkv, *got_kv, lj, tables, impl=impl, **tuning)
    assert got.shape == q.shape
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype,splits", [(jnp.float32, 1), (jnp.float32, 4), (jnp.bfloat16, 2)])
def test_decode_rope_write_is_rope_then_write_then_attend(dtype, splits):
    """decode_rope_write (one GPU kernel, interpret mode) from the fused projection's raw rows: the
    model's apply_rope on q and k, then write_kv, then decode_attention (reference, on those). The
    new token's K/V reach the pages; an inactive row (length 0, slot -1) writes and returns nothing."""
    from jtrail.models.llama import apply_rope, rope_inv_freq, rope_rows

    rng = np.random.default_rng(5 + splits)
    hkv, g, d, page, lens = 2, 3, 64, 8, [9, 1, 26, 0]
    k, v, tables = make_cache(rng, lens, hkv, d, page, dtype)
    tb = np.asarray(tables)  # each new token lands at position n - 1, its sequence's last
    slots = jnp.asarray([tb[i, (n - 1) // page] * page + (n - 1) % page if n else -1
                         for i, n in enumerate(lens)], jnp.int32)
    qkv = jnp.asarray(rng.standard_normal((len(lens), hkv, g + 2, d)), dtype)
    pos, lj = jnp.asarray([max(n - 1, 0) for n in lens]), jnp.asarray(lens, jnp.int32)
    inv_freq = rope_inv_freq(d, 10000.0, None)
    rotated = apply_rope(qkv[:, None, :, :g + 1], pos[:, None], inv_freq)[:, 0]  # the model's RoPE
    want_kv = reference.write_kv(k, v, rotated[:, :, g], qkv[:, :, g + 1], slots)
    want = reference.decode_attention(rotated[:, :, :g].reshape(len(lens), hkv * g, d), *want_kv, lj, tables)
    rows = rope_rows(pos, inv_freq)
    got, *got_kv = ops.decode_rope_write(qkv, jnp.array(k), jnp.array(v), lj, tables, slots, rows,
                                         impl="pallas_interpret", num_splits=splits)
    ref_out, *ref_kv = ops.decode_rope_write(qkv, jnp.array(k), jnp.array(v), lj, tables, slots, rows,
                                             impl="reference")
    assert got.shape == (len(lens), hkv * g, d)
    assert rel_err(got, want) < TOL[dtype] and rel_err(ref_out, want) < TOL[dtype]
    assert not np.asarray(got[3], np.float32).any()
    for w, gk, rk in zip(want_kv, got_kv, ref_kv, strict=True):  # (f32 rounding of the rotation may differ)
        np.testing.assert_allclose(np.asarray(gk, np.float32), np.asarray(w, np.float32),
                                   rtol=1e-6 if dtype == jnp.float32 else 1e-2, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(rk, np.float32), np.asarray(w, np.float32))
    np.testing.assert_array_equal(np.asarray(got_kv[1][:, tb[0, 1], 0], np.float32),
                                  np.asarray(qkv[0, :, g + 1], np.float32))  # seq 0's v, position 8


@pytest.mark.parametrize("impl", ["pallas_interpret", "tpu_interpret", "reference"])
def test_zero_length_gives_zeros(impl):
    rng = np.random.default_rng(2)
    k, v, tables = make_cache(rng, [0, 9], hkv=1, d=64, page=8, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    out = ops.decode_attention(q, k, v, jnp.asarray([0, 9], jnp.int32), tables, impl=impl)
    assert not np.asarray(out[0]).any()
    assert rel_err(out[1], reference.decode_attention(q, k, v, jnp.asarray([0, 9]), tables)[1]) < 1e-5


@settings(max_examples=3, deadline=None)
@given(data=st.data(), ratio=st.sampled_from([1, 4, 8]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_decode_tpu_kernel_interpret(data, ratio, dtype):
    page = 8
    lens = data.draw(_lens(page))
    rng = np.random.default_rng(len(lens) + 7 * ratio)
    k, v, tables = make_cache(rng, lens, hkv=1, d=128, page=page, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((len(lens), ratio, 128)), dtype)
    lj = jnp.asarray(lens, jnp.int32)
    want = reference.decode_attention(q, k, v, lj, tables, softcap=5.0)
    got = jax.block_until_ready(ops.decode_attention(q, k, v, lj, tables, softcap=5.0, impl="tpu_interpret"))
    assert rel_err(got, want) < TOL[dtype]


def test_prefill_tpu_kernel_interpret():
    rng = np.random.default_rng(3)
    lens = np.array([7, 12])
    q_lens = np.array([3, 5])
    k, v, tables = make_cache(rng, list(lens), hkv=2, d=64, page=4, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 5, 6, 64)), jnp.float32)
    args = (q, k, v, jnp.asarray(lens - q_lens, jnp.int32), jnp.asarray(q_lens, jnp.int32), tables)
    got = jax.block_until_ready(ops.prefill_attention(*args, impl="tpu_interpret", block_t=2))
    assert rel_err(got, reference.prefill_attention(*args)) < 1e-5


def test_bad_inputs_raise_clear_errors():
    k = jnp.zeros((3, 4, 8, 64))
    tables = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match="multiple of num kv heads"):
        ops.decode_attention(jnp.zeros((2, 4, 64)), k, k, jnp.ones(2, jnp.int32), tables,
                             impl="pallas_interpret")
    with pytest.raises(ValueError, match="head_dim"):
        ops.decode_attention(jnp.zeros((2, 3, 32)), k, k, jnp.ones(2, jnp.int32), tables,
                             impl="pallas_interpret")
    with pytest.raises(ValueError, match="block_tables"):
        ops.decode_attention(jnp.zeros((3, 3, 64)), k, k, jnp.ones(3, jnp.int32), tables,
                             impl="pallas_interpret")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.decode_attention(jnp.zeros((2, 3, 64)), k, k, jnp.ones(2, jnp.int32), tables, impl="cuda")
    with pytest.raises(ValueError, match="k_new/v_new"):
        ops.write_kv(k, k, jnp.zeros((2, 3, 32)), jnp.zeros((2, 3, 32)), jnp.zeros(2, jnp.int32),
                     impl="pallas_interpret")
    # the fused-qkv entry points: [N, Hkv, G + 2, D] with G >= 1, k/v rows matching the pages
    with pytest.raises(ValueError, match="G \\+ 2"):
        ops.write_kv_from_qkv(k, k, jnp.zeros((2, 3, 2, 64)), jnp.zeros(2, jnp.int32),
                              impl="pallas_interpret")
    with pytest.raises(ValueError, match="qkv's k and v rows"):
        ops.write_kv_from_qkv(k, k, jnp.zeros((2, 3, 3, 32)), jnp.zeros(2, jnp.int32),
                              impl="pallas_interpret")
    with pytest.raises(ValueError, match="G \\+ 2"):
        ops.decode_attention_from_qkv(jnp.zeros((2, 3, 2, 64)), k, k, jnp.ones(2, jnp.int32), tables,
                                      impl="pallas_interpret")
    with pytest.raises(ValueError, match="head_dim"):
        ops.decode_attention_from_qkv(jnp.zeros((2, 3, 3, 32)), k, k, jnp.ones(2, jnp.int32), tables,
                                      impl="pallas_interpret")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="pallas_interpret"):
            ops.decode_attention(jnp.zeros((2, 3, 64)), k, k, jnp.ones(2, jnp.int32), tables,
                                 impl="pallas")


def test_decode_auto_splits_are_the_measured_choices():
    """The split-K rule picks what the H200 measurements chose (results/decode_splits.json for SmolLM2's
    3 kv heads, KERNEL_NOTES for Llama's 8): (batch, kv heads, table pages of 16 tokens) -> splits."""
    from jtrail.kernels.paged_attention_gpu import _auto_splits

    measured = {(32, 3, 52): 4, (32, 3, 128): 4, (128, 3, 52): 2,  # SmolLM2, ctx 512
                (64, 8, 32): 1, (128, 8, 64): 1, (32, 8, 128): 4}  # Llama: b64/512, b128/1k, b32/2k
    assert {k: _auto_splits(*k, 16) for k in measured} == measured
