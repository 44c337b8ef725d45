"""Split-K of the paged decode kernel at SmolLM2's heads, as the engine calls it (issue 16).

    python -m jtrail.bench.decode_splits [--smoke]     # -> $OUT/decode_splits.json (or ./)
    python -m jtrail.bench.decode_splits --set warps   # warps / pipeline stages at the engine's shapes

In the engine's decode step the attention kernel was the largest device op (H200, random SmolLM2
weights, ctx 512, batch 32: 30 calls a step, 594 of 1,499 us busy; `graph_modes` ops_by_name): 96
programs (32 sequences x 3 kv heads) on 132 SMs, each walking its 512 keys 32 at a time, so latency,
not bytes, sets its time. Split-K gives each sequence more programs. The split used to cut the block
*table* into contiguous ranges, and a serving table is as wide as max_model_len (2,048 tokens), so
at ctx 512 every split but the first was empty; `strided_splits` deals blocks round-robin instead
(split s reads blocks s, s + S, ...), so every split has work at any length.

Per shape (batch, context, table width in pages), every variant runs 30 times chained in one jit
(the model's 30 layers; kernel_timing.chain), all variants interleaved over many reps; each variant's
output is checked against the jnp reference. Lengths are drawn per row in [ctx/2, ctx].
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jtrail.bench.kernel_timing import DT, KernelRun, bench_group, decode_variants, make_cache
from jtrail.kernels import reference

SMOL = KernelRun(hq=9, hkv=3, d=64, decode_timing=(30, 15))
SHAPES = ((32, 512, 52), (32, 512, 128), (128, 512, 52), (128, 512, 128), (32, 1024, 128))
VARIANTS: dict[str, dict] = {
    "auto_contiguous": dict(strided_splits=False),  # the kernel's default rule before the change
    "s1_p2w1": dict(num_splits=1, pages_per_block=2, num_warps=1),
    "s1_p4w2": dict(num_splits=1, pages_per_block=4, num_warps=2),
    "c2_p2w1": dict(num_splits=2, pages_per_block=2, num_warps=1, strided_splits=False),
    "c4_p2w1": dict(num_splits=4, pages_per_block=2, num_warps=1, strided_splits=False),
    "s2_p2w1": dict(num_splits=2, pages_per_block=2, num_warps=1),
    "s4_p2w1": dict(num_splits=4, pages_per_block=2, num_warps=1),
    "s8_p2w1": dict(num_splits=8, pages_per_block=2, num_warps=1),
    "s2_p4w2": dict(num_splits=2, pages_per_block=4, num_warps=2),
    "s4_p4w2": dict(num_splits=4, pages_per_block=4, num_warps=2),
    "s4_p1w1": dict(num_splits=4, pages_per_block=1, num_warps=1),
}
# --set warps: the issue-16 rows' shapes (ctx 512 growing by 256 tokens: lengths drawn in [384, 768], a
# 50-page table) against the default rule ("auto"), over warps and Triton's software-pipeline stages
WARP_SHAPES = ((32, 768, 50), (128, 768, 50))
WARP_VARIANTS: dict[str, dict] = {
    "auto": {},
    "s2_p4w4": dict(num_splits=2, pages_per_block=4, num_warps=4),
    "s2_p8w4": dict(num_splits=2, pages_per_block=8, num_warps=4),
    "s1_p8w4": dict(num_splits=1, pages_per_block=8, num_warps=4),
    "s4_p4w4": dict(num_splits=4, pages_per_block=4, num_warps=4),
    "s2_p4w2_st2": dict(num_splits=2, pages_per_block=4, num_warps=2, num_stages=2),
    "s2_p4w2_st3": dict(num_splits=2, pages_per_block=4, num_warps=2, num_stages=3),
    "s4_p2w1_st2": dict(num_splits=4, pages_per_block=2, num_warps=1, num_stages=2),
    "s4_p4w2_st2": dict(num_splits=4, pages_per_block=4, num_warps=2, num_stages=2),
    "s1_p4w2_st2": dict(num_splits=1, pages_per_block=4, num_warps=2, num_stages=2),
    "s2_p8w8": dict(num_splits=2, pages_per_block=8, num_warps=8),
    "s4_p2w1": dict(num_splits=4, pages_per_block=2, num_warps=1),
    "s4_p4w2": dict(num_splits=4, pages_per_block=4, num_warps=2),
    "s8_p2w2": dict(num_splits=8, pages_per_block=2, num_warps=2),
}
SMOKE_SHAPES = ((2, 32, 6),)  # interpret mode: the old rule, unsplit, contiguous and strided splits
SMOKE_VARIANTS = ("auto_contiguous", "s1_p2w1", "c2_p2w1", "s4_p1w1")
SMOKE = KernelRun(hq=9, hkv=3, d=64, interpret=True, decode_timing=(2, 2))


def shape_rows(b: int, ctx: int, width: int, run: KernelRun, variants: dict[str, dict],
               baseline: str = "auto_contiguous") -> dict:
    # kernel_timing's cache (two disjoint table sets, page 0 null), its tables widened with null pages
    key = jax.random.key(b * ctx + width)
    k, v, tables = make_cache(key, b, ctx, run)
    tables = jnp.pad(tables, ((0, 0), (0, 0), (0, width - tables.shape[2])))
    rng = np.random.default_rng(b * ctx + width)
    lengths = jnp.asarray(rng.integers(ctx // 2, ctx + 1, b), jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 2), (b, run.hq, run.d), DT)
    want = reference.decode_attention(q, k, v, lengths, tables[0])
    fns, errs = decode_variants(variants, (q, tables[0], k, v, lengths), want, run, f"b{b} ctx{ctx} w{width}")
    iters, reps = run.decode_timing
    ts = bench_group(fns, (q, tables, k, v, lengths), iters=iters, reps=reps)
    base = ts.get(baseline)
    out = {}
    for name, t in ts.items():
        out[name] = {"us_per_call": round(float(np.median(t)) * 1e6, 2), "rel_err": errs[name],
                     "auto_over_this": None if base is None else round(float(np.median(base / t)), 3)}
        print(f"b{b:4d} ctx{ctx:5d} w{width:4d} {name:16s} {out[name]['us_per_call']:8.2f} us "
              f"auto/this {out[name]['auto_over_this']} err {errs[name]:.1e}", flush=True)
    return out


def main(argv: list[str]) -> None:
    smoke, warps = "--smoke" in argv, "warps" in argv
    run, shapes = (SMOKE, SMOKE_SHAPES) if smoke else (SMOL, WARP_SHAPES if warps else SHAPES)
    variants = {k: VARIANTS[k] for k in SMOKE_VARIANTS} if smoke else WARP_VARIANTS if warps else VARIANTS
    baseline = "auto" if warps else "auto_contiguous"
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "git_commit": os.environ.get("GIT_COMMIT"),
           "device": jax.devices()[0].device_kind, "heads": [run.hq, run.hkv, run.d], "page": run.page,
           "calls_chained": run.decode_timing[0], "reps": run.decode_timing[1], "shapes": {}}
    path = os.path.join(os.environ.get("OUT") or ".", "decode_warps.json" if warps else "decode_splits.json")
    for b, ctx, width in shapes:
        res["shapes"][f"b{b}_ctx{ctx}_w{width}"] = shape_rows(b, ctx, width, run, variants, baseline)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
