"""Paged-attention kernel timings and checks of `benchmarks/kernels.py` (GPU; `--smoke`: the same code
on CPU with tiny shapes, Pallas interpret mode and 2 x 2 timings, so the suite runs it end to end).

Timing: each op runs K times in one jitted, unrolled chain (its output feeds the next call's query, so
nothing is hoisted) and alternates between two disjoint sets of pages so the KV working set is 2x the
shape's cache (past L2). All ops of one shape are timed interleaved (A, B, C, A, B, C, ...; many
reps), and ratios are the median of per-rep ratios, so clock drift between reps cancels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jtrail.kernels import reference
from jtrail.kernels.paged_attention_gpu import decode_attention_pallas, prefill_attention_pallas_gpu

DT = jnp.bfloat16


@dataclass(frozen=True)
class KernelRun:
    """Head shapes and how the kernels are run and timed. The defaults are the GPU benchmark's."""

    hq: int = 32
    hkv: int = 8
    d: int = 128
    page: int = 16
    interpret: bool = False  # Pallas interpret mode: the GPU kernels' code run by XLA on CPU
    decode_timing: tuple[int, int] = (20, 21)  # (calls chained in one jit, interleaved reps)
    prefill_timing: tuple[int, int] = (10, 15)
    copy_elems: int = 512 * 1024 * 1024  # 1 GiB of bf16: past any cache
    jax_kernel: tuple[tuple[str, int], ...] = ()  # arguments of JAX's kernel (its defaults: k_splits 16)
    check_dtypes: tuple = (jnp.float32, jnp.bfloat16)
    check_heads: tuple[tuple[int, int, int], ...] = ((32, 8, 128), (9, 3, 64), (8, 8, 64))  # (hq, hkv, d)


GPU = KernelRun()
# CPU smoke run: every code path once, at sizes interpret mode runs in seconds.
SMOKE = KernelRun(hq=8, hkv=2, d=32, interpret=True, decode_timing=(2, 2), prefill_timing=(2, 2),
                  copy_elems=1 << 20, jax_kernel=(("k_splits", 1), ("pages_per_compute_block", 2)),
                  check_dtypes=(jnp.float32,), check_heads=((9, 3, 64),))


def chain(fn, iters: int):
    """fn(q, tables, *rest) -> q-shaped, chained `iters` times in one jit (unrolled: an XLA while
    loop on GPU syncs with the host every trip)."""

    @jax.jit
    def loop(q, tables, *rest):
        for i in range(iters):
            q = fn(q, tables[i % 2], *rest).astype(q.dtype)
        return q

    return loop


def bench_group(fns: dict, args, *, iters: int = 20, reps: int = 21) -> dict:
    """Seconds per call for each fn, timed interleaved: -> {name: np.array of per-rep times}.
    A fn that fails to compile is reported and left out."""
    loops = {}
    for name, fn in fns.items():
        try:
            loops[name] = chain(fn, iters)
            jax.block_until_ready(loops[name](*args))
        except Exception as e:  # a variant that fails to compile is reported, not fatal
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            loops.pop(name)
    times = {name: [] for name in loops}
    for _ in range(reps):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            jax.block_until_ready(loop(*args))
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: np.array(t) for name, t in times.items()}


def copy_bandwidth(run: KernelRun = GPU, iters: int = 20) -> float:
    """Read+write bytes per second of an elementwise op over run.copy_elems bf16 (donated, queued)."""
    x = jax.random.normal(jax.random.key(0), (run.copy_elems,), jnp.bfloat16)
    f = jax.jit(lambda x: 1.0 - x, donate_argnums=0)  # (x*1.0001 rounds to x*1 in bf16: a no-op)
    x = jax.block_until_ready(f(x))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            x = f(x)
        jax.block_until_ready(x)
        ts.append((time.perf_counter() - t0) / iters)
    return 2 * x.nbytes / float(np.median(ts))


def make_cache(key, b: int, ctx: int, run: KernelRun):
    """Two disjoint block-table sets over one shuffled cache; returns (k, v, tables [2, B, P])."""
    p = ctx // run.page
    num_pages = 2 * b * p + 1
    kk, kv, kp = jax.random.split(key, 3)
    k = jax.random.normal(kk, (run.hkv, num_pages, run.page, run.d), DT)
    v = jax.random.normal(kv, (run.hkv, num_pages, run.page, run.d), DT)
    perm = jax.random.permutation(kp, num_pages - 1)[: 2 * b * p] + 1  # page 0 stays null
    return k, v, perm.reshape(2, b, p).astype(jnp.int32)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def decode_variants(variants: dict, args: tuple, ref, run: KernelRun, tag: str) -> tuple[dict, dict]:
    """Our decode kernel under each variant (kwargs), as fn(q, tables, k, v, lengths), and its error
    against `ref` on `args` = (q, tables, k, v, lengths): -> ({key: fn}, {key: rel_err}). A variant
    that fails to compile is reported and left out."""
    fns, errs = {}, {}
    for key, var in variants.items():
        f = lambda q, t, k, v, n, var=var: decode_attention_pallas(q, k, v, n, t, interpret=run.interpret,
                                                                   **var)
        try:
            errs[key] = rel_err(f(*args), ref)
            fns[key] = f
        except Exception as e:  # a variant that fails to compile is reported, not fatal
            print(f"{tag} {var}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return fns, errs


def decode_rows(b: int, ctx: int, variants: list[dict], run: KernelRun = GPU) -> list[dict]:
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    k, v, tables = make_cache(jax.random.key(b * ctx), b, ctx, run)
    q = jax.random.normal(jax.random.key(1), (b, run.hq, run.d), DT)
    lengths = jnp.full((b,), ctx, jnp.int32)
    nbytes = 2 * b * ctx * run.hkv * run.d * 2 + 2 * q.nbytes
    scale = run.d**-0.5
    ref = reference.decode_attention(q, k, v, lengths, tables[0])
    fns = {"jax": lambda q, t, k, v, n: paged_attention(q * scale, k, v, t, n, interpret=run.interpret,
                                                                  **dict(run.jax_kernel)),
           "ref": lambda q, t, k, v, n: reference.decode_attention(q, k, v, n, t)}
    ours, errs = decode_variants(dict(enumerate(variants)), (q, tables[0], k, v, lengths), ref, run,
                                 f"decode b{b} ctx{ctx}")
    fns.update(ours)
    iters, reps = run.decode_timing
    ts = bench_group(fns, (q, tables, k, v, lengths), iters=iters, reps=reps)
    rows = []
    for i, var in enumerate(variants):
        if i not in ts:
            continue
        t = float(np.median(ts[i]))
        rows.append(dict(kind="decode", batch=b, ctx=ctx, variant=var, us=t * 1e6, rel_err=errs[i],
                         tb_s=nbytes / t / 1e12, jax_us=float(np.median(ts["jax"])) * 1e6,
                         speedup_vs_jax=float(np.median(ts["jax"] / ts[i])),
                         ref_us=float(np.median(ts["ref"])) * 1e6,
                         speedup_vs_ref=float(np.median(ts["ref"] / ts[i])),
                         rep_us=[round(x * 1e6, 1) for x in ts[i]],
                         jax_rep_us=[round(x * 1e6, 1) for x in ts["jax"]]))
        r = rows[-1]
        print(f"decode b{b:4d} ctx{ctx:5d} {str(var):56s} {t*1e6:8.1f}us {r['tb_s']:.2f}TB/s "
              f"vsJAX {r['speedup_vs_jax']:.2f}x vsRef {r['speedup_vs_ref']:.2f}x err {errs[i]:.1e}",
              flush=True)
    return rows


def prefill_rows(b: int, t_len: int, variants: list[dict], run: KernelRun = GPU) -> list[dict]:
    k, v, tables = make_cache(jax.random.key(7), b, t_len, run)
    q = jax.random.normal(jax.random.key(2), (b, t_len, run.hq, run.d), DT)
    q_start = jnp.zeros((b,), jnp.int32)
    q_lens = jnp.full((b,), t_len, jnp.int32)
    kd = jax.random.normal(jax.random.key(3), (b, t_len, run.hkv, run.d), DT)
    vd = jax.random.normal(jax.random.key(4), (b, t_len, run.hkv, run.d), DT)
    impl = "cudnn"
    dense = lambda q, t, k, v, kd, vd: jax.nn.dot_product_attention(q, kd, vd, is_causal=True,
                                                                    implementation="cudnn")
    try:
        jax.block_until_ready(dense(q, tables[0], k, v, kd, vd))
    except Exception as e:
        print("cudnn flash unavailable:", type(e).__name__, str(e)[:200])
        impl = "xla"
        dense = lambda q, t, k, v, kd, vd: jax.nn.dot_product_attention(q, kd, vd, is_causal=True)
    ref = reference.prefill_attention(q, k, v, q_start, q_lens, tables[0])
    flops = 4 * b * run.hq * run.d * t_len * (t_len + 1) / 2
    fns, errs = {"dense": dense}, {}
    for i, var in enumerate(variants):
        f = lambda q, t, k, v, kd, vd, var=var: prefill_attention_pallas_gpu(q, k, v, q_start, q_lens,
                                                                             t, interpret=run.interpret,
                                                                             **var)
        try:
            errs[i] = rel_err(f(q, tables[0], k, v, kd, vd), ref)
            fns[i] = f
        except Exception as e:
            print(f"prefill b{b} T{t_len} {var}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    iters, reps = run.prefill_timing
    ts = bench_group(fns, (q, tables, k, v, kd, vd), iters=iters, reps=reps)
    t_dense = float(np.median(ts["dense"]))
    rows = []
    for i, var in enumerate(variants):
        if i not in ts:
            continue
        t = float(np.median(ts[i]))
        ratio = float(np.median(ts[i] / ts["dense"]))
        rows.append(dict(kind="prefill", batch=b, ctx=t_len, variant=var, us=t * 1e6, rel_err=errs[i],
                         tflops=flops / t / 1e12, dense_impl=impl, dense_us=t_dense * 1e6,
                         time_vs_dense=ratio, rep_us=[round(x * 1e6, 1) for x in ts[i]],
                         dense_rep_us=[round(x * 1e6, 1) for x in ts["dense"]]))
        print(f"prefill b{b} T{t_len} {str(var):56s} {t*1e6:8.1f}us {flops/t/1e12:6.1f}TFLOP/s "
              f"dense[{impl}] {t_dense*1e6:8.1f}us ratio {ratio:.2f} err {errs[i]:.1e}", flush=True)
    return rows


def best_per_shape(table: list[dict], kind: str, shapes) -> list[dict]:
    """The fastest variant of `kind` for each (batch, ctx) in `shapes`."""
    best: dict[tuple, dict] = {}
    for r in table:
        key = (r["batch"], r["ctx"])
        if r["kind"] == kind and key in shapes and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    return list(best.values())


def kernel_bars(table: list[dict], short_shape: tuple[int, int], bw_shapes) -> tuple[dict, list[dict]]:
    """The bars (decode speed-up over JAX's kernel at `short_shape`, the worst fraction of copy
    bandwidth over `bw_shapes`, the worst prefill time over dense flash) and the rows they come from."""
    every = {(r["batch"], r["ctx"]) for r in table}
    short = best_per_shape(table, "decode", {short_shape})
    long = best_per_shape(table, "decode", set(bw_shapes))
    prefill = best_per_shape(table, "prefill", every)
    bars = dict(decode_speedup_vs_jax=short[0]["speedup_vs_jax"] if short else None,
                decode_bw_fraction_long=min(r["copy_frac"] for r in long) if long else None,
                prefill_time_vs_dense_flash=max(r["time_vs_dense"] for r in prefill) if prefill else None)
    return bars, short + best_per_shape(table, "decode", every) + prefill


def gpu_check(run: KernelRun = GPU) -> dict:
    """Correctness on the GPU itself (interpret mode: on CPU): ragged lengths, every slot outside a
    sequence is NaN."""
    from jtrail.kernels import ops

    out = {}
    rng = np.random.default_rng(0)
    impl = "pallas_interpret" if run.interpret else "pallas"
    page = run.page
    for dt in run.check_dtypes:
        for hq, hkv, d in run.check_heads:
            b, p = 5, 9
            lens = np.array([1, page, page + 1, p * page, 37])
            num_pages = b * p + 3
            k = np.full((hkv, num_pages, page, d), np.nan, np.float32)
            v = k.copy()
            tables = (rng.permutation(num_pages - 1)[: b * p] + 1).reshape(b, p).astype(np.int32)
            for i, n in enumerate(lens):
                for pos in range(n):
                    pg, off = tables[i, pos // page], pos % page
                    k[:, pg, off] = rng.standard_normal((hkv, d))
                    v[:, pg, off] = rng.standard_normal((hkv, d))
                tables[i, -(-n // page):] = 0  # unused entries point at the (NaN) null page
            k, v, tables = jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(tables)
            q = jnp.asarray(rng.standard_normal((b, hq, d)), dt)
            lj = jnp.asarray(lens, jnp.int32)
            r = reference.decode_attention(q, k, v, lj, tables, softcap=30.0)
            o = ops.decode_attention(q, k, v, lj, tables, softcap=30.0, impl=impl)
            out[f"decode_{np.dtype(dt).name}_{hq}_{hkv}_{d}"] = rel_err(o, r)
            for ns in (2, 4):
                o = ops.decode_attention(q, k, v, lj, tables, impl=impl, num_splits=ns,
                                         pages_per_block=2)
                r = reference.decode_attention(q, k, v, lj, tables)
                out[f"decode_split{ns}_{np.dtype(dt).name}_{hq}_{hkv}_{d}"] = rel_err(o, r)
            t = 24
            qp = jnp.asarray(rng.standard_normal((b, t, hq, d)), dt)
            qs = jnp.asarray(np.maximum(lens - 20, 0), jnp.int32)
            ql = jnp.asarray(np.minimum(lens, 20), jnp.int32)
            r = reference.prefill_attention(qp, k, v, qs, ql, tables)
            o = ops.prefill_attention(qp, k, v, qs, ql, tables, impl=impl)
            out[f"prefill_{np.dtype(dt).name}_{hq}_{hkv}_{d}"] = rel_err(o, r)
            kn = jnp.asarray(rng.standard_normal((6, hkv, d)), dt)
            sm = jnp.asarray([3, -1, 17, 40, -5, 2], jnp.int32)
            rk, rv = reference.write_kv(k, v, kn, kn * 2, sm)
            ok, ov = ops.write_kv(jnp.array(k), jnp.array(v), kn, kn * 2, sm, impl=impl)
            same = np.array_equal(np.asarray(ok, np.float32), np.asarray(rk, np.float32), equal_nan=True)
            same_v = np.array_equal(np.asarray(ov, np.float32), np.asarray(rv, np.float32), equal_nan=True)
            out[f"write_kv_{np.dtype(dt).name}_{hq}_{hkv}_{d}_exact"] = bool(same and same_v)
    for name, val in out.items():
        print(f"check {name}: {val}")
    return out
