"""Benchmark the paged-attention kernels on the GPU against JAX's kernel, the jnp reference, the
HBM copy ceiling and dense causal flash attention. Writes benchmarks/results/kernels.json (and a copy
under $OUT when set). --smoke: the same code on CPU (Pallas interpret mode, tiny shapes), to --out only.

    python benchmarks/kernels.py [--quick | --sweep | --smoke --out PATH]

Timing: each op runs K times in one jitted, unrolled chain (its output feeds the next call's query, so
nothing is hoisted) and alternates between two disjoint sets of pages so the KV working set is 2x the
shape's cache (past L2). All ops of one shape are timed interleaved (A, B, C, A, B, C, ...; many
reps), and ratios are the median of per-rep ratios, so clock drift between reps cancels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax

from jtrail.bench import kernel_timing as kt
from jtrail.provenance import git_commit

# Variants per group: {} is the defaults (what the engine runs); the others are alternatives.
# Run 6 (KERNEL_NOTES.md) made its best variants the defaults; the defaults before run 6 stay here
# explicitly ("old"), so the next run compares old and new defaults side by side. Shapes: page 16, G=4.
OLD_DECODE_SHORT = dict(pages_per_block=4, num_warps=2)  # 64 tokens/step, 2 warps (long: still {})
OLD_PREFILL = dict(block_t=16, pages_per_block=4)  # 64 packed rows x 64 keys (4 warps, 2 stages)
DECODE_SHORT = [{}, OLD_DECODE_SHORT, dict(pages_per_block=2, num_warps=1, num_stages=2),
                dict(pages_per_block=2, num_warps=2, num_stages=2)]
# Run 7: 128 tokens/step with 4 warps (half the steps per program, 2x the bytes in flight) and 8 splits
# at b32/2k, the bar's worst shape (run 6: 0.65 of copy bw); 2-stage variants were 1.4-1.9x slower.
DECODE_LONG = [{}, dict(pages_per_block=2, num_warps=1), dict(pages_per_block=8, num_warps=4),
               dict(pages_per_block=8, num_warps=4, num_splits=8), dict(pages_per_block=4, num_splits=8)]
PREFILL = [{}, OLD_PREFILL, dict(num_stages=3)]
SWEEP = dict(  # --sweep: a wider search, used to pick the defaults
    short=[{}, OLD_DECODE_SHORT, dict(pages_per_block=2, num_warps=1, num_splits=2),
           dict(pages_per_block=2, num_warps=1, num_splits=4),
           dict(pages_per_block=2, num_warps=1, num_stages=2),
           dict(pages_per_block=2, num_warps=2, num_stages=2),
           dict(pages_per_block=2, num_warps=1, num_stages=3),
           dict(pages_per_block=1, num_warps=1, num_stages=3)],
    long=[{}, dict(pages_per_block=2, num_warps=1), dict(pages_per_block=2, num_warps=1, num_splits=8),
          dict(pages_per_block=2, num_warps=1, num_splits=16),
          dict(pages_per_block=2, num_warps=1, num_stages=2),
          dict(pages_per_block=2, num_warps=2, num_stages=2)],
    prefill=[{}, OLD_PREFILL, dict(num_stages=3), dict(num_stages=4), dict(num_warps=8),
             dict(block_t=16, pages_per_block=4, num_stages=3), dict(pages_per_block=2, num_stages=3),
             dict(num_warps=2)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU: interpret mode, tiny shapes, 2 x 2 timings")
    ap.add_argument("--out", help="the JSON's path (default: benchmarks/results/kernels.json and $OUT)")
    args = ap.parse_args()
    if args.smoke and not args.out:
        ap.error("--smoke needs --out (a smoke run's figures are not results)")
    run = kt.SMOKE if args.smoke else kt.GPU
    checks = kt.gpu_check(run)
    bw0 = kt.copy_bandwidth(run)
    print(f"device {jax.devices()[0].device_kind}  jax {jax.__version__}  copy bw {bw0/1e12:.2f} TB/s")
    short, long, pv = DECODE_SHORT, DECODE_LONG, PREFILL
    shapes = ((32, 2048), (64, 2048), (32, 4096), (128, 1024), (8, 4096))
    short_shape, prefill_shape = (64, 512), (4, 1024)  # (batch, ctx) of the decode bar and of prefill
    if args.sweep:
        short, long, pv, shapes = SWEEP["short"], SWEEP["long"], SWEEP["prefill"], shapes[:4]
    if args.quick:
        short, long, pv, shapes = short[:1], long[:1], pv[:1], shapes[:1]
    if args.smoke:  # tiny shapes; the defaults and one other variant at the short shape
        short, long, pv, shapes = short[:2], long[:1], pv[:1], ((2, 64),)
        short_shape, prefill_shape = (2, 32), (1, 24)
    bw_shapes = shapes if args.smoke else [s for s in shapes if s[0] >= 32 and s[1] >= 2048]
    def partial(rows):  # keep what was measured if the run is cut off
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "kernels_partial.json"), "w") as fh:
                json.dump(rows, fh)
        return rows

    table = partial(kt.prefill_rows(*prefill_shape, pv, run))
    table += partial(kt.decode_rows(*short_shape, short, run))
    for b, ctx in shapes:
        table += partial(kt.decode_rows(b, ctx, long, run))
    bw1 = kt.copy_bandwidth(run)
    bw = max(bw0, bw1)  # the higher reading: the conservative ceiling
    for r in table:
        if r["kind"] == "decode":
            r["copy_frac"] = r["tb_s"] * 1e12 / bw

    bars, best = kt.kernel_bars(table, short_shape, bw_shapes)
    res = dict(command="python benchmarks/kernels.py " + " ".join(sys.argv[1:]),
               device=jax.devices()[0].device_kind, jax_version=jax.__version__,
               date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               git_commit=git_commit(), copy_bw_tb_s=bw / 1e12,
               copy_bw_readings_tb_s=[bw0 / 1e12, bw1 / 1e12],
               shapes=dict(hq=run.hq, hkv=run.hkv, d=run.d, page=run.page, dtype="bfloat16"),
               smoke=args.smoke, checks=checks, table=table, best=best, bars=bars)
    for r in table:
        if r["kind"] == "decode":
            print(f"decode b{r['batch']:4d} ctx{r['ctx']:5d} {str(r['variant']):56s} {r['us']:8.1f}us "
                  f"copy {r['copy_frac']:.2f} vsJAX {r['speedup_vs_jax']:.2f}x")
    print(f"copy bw readings {bw0/1e12:.2f} {bw1/1e12:.2f} TB/s")
    print(json.dumps(bars))
    outs = [args.out] if args.out else [os.path.join(d, "kernels.json") for d in ("benchmarks/results",
                                                                                  os.environ.get("OUT")) if d]
    for path in outs:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
