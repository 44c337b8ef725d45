"""Scale beyond one chip: decode throughput at TP=2 vs TP=1, and 2 data-parallel replicas vs 1.

Llama-3-8B shape, bf16 random weights made directly on the devices (`init_sharded`), a paged KV cache
pre-filled to `--ctx` tokens per sequence (contents do not change the speed, so no prefill is run),
then greedy decode with the serving engine's paged attention function (`make_paged_attention`:
kernels write_kv + decode_attention, Pallas on GPU) run per kv-head shard under TP. Several decode
steps run in one jitted call (lax.fori_loop), as the engine does, so host overhead is amortized.

Replicas: each replica is a TP=1 model on its own device; both are driven from one host thread
(JAX dispatch is asynchronous, so the two GPUs run concurrently). Same total load = the same requests
with the same per-replica slot count B: one replica serves 2B requests in two waves of B, two replicas
serve B each at once (bar `replicas2_over_1_throughput`). The table also has the split variant (a
batch of B over one replica vs B/2 on each of two).

    python benchmarks/scale.py            # GPU: llama3-8b, batch 64/128, ctx 1024 (needs 2 devices)
    python benchmarks/scale.py --smoke    # CPU: tiny model on 4 fake devices, seconds

Writes benchmarks/results/scale.json (and $OUT/scale.json), merging into an existing file so the
router simulation's bars written by another script are kept.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jtrail.bench.scale_decode import ATTN_DESC, bench  # noqa: E402
from jtrail.provenance import git_commit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU fake devices")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="decode steps per jitted call")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per configuration")
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--attention", choices=("paged", "contiguous"), default="paged")
    args = ap.parse_args()
    small = dict(model="tiny", batches=[4, 8], ctx=32, steps=4, calls=2)
    full = dict(model="llama3-8b", batches=[64, 128], ctx=1024, steps=16, calls=6)
    for k, v in (small if args.smoke else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if len(jax.devices()) < 2:
        sys.exit(f"scale benchmark needs >= 2 devices, have {jax.devices()}")
    attention, fallback_error, result = args.attention, None, None
    try:
        result = bench(args, attention)
    except Exception as e:  # e.g. a Pallas kernel failing under shard_map: measure with jnp attention
        if attention != "paged":
            raise
        fallback_error = f"{type(e).__name__}: {str(e)[:500]}"
    if result is None:  # outside the except block, so the failed run's arrays can be freed
        print(f"paged attention failed ({fallback_error}); falling back to contiguous", flush=True)
        attention = "contiguous"
        gc.collect()
        result = bench(args, attention)
    table, ratios = result
    bmax = max(args.batches)
    bars = {"tp2_over_tp1_throughput": ratios[f"tp2_over_tp1_b{bmax}"],
            "replicas2_over_1_throughput": ratios[f"replicas2_over_1_b{bmax}"]}
    section = dict(
        command="python " + " ".join(sys.argv),
        device=f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
        jax_version=jax.__version__, date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        method=("self-contained jitted multi-step greedy decode (lax.fori_loop) over models/llama.py; "
                f"attention: {attention} KV cache ({ATTN_DESC[attention]}), per kv-head shard under TP; "
                "KV pre-filled to ctx (no prefill); random weights made on device"),
        fallback_error=fallback_error,
        shapes=dict(model=args.model, dtype="float32" if args.smoke else "bfloat16", ctx=args.ctx,
                    batches=args.batches, steps_per_call=args.steps, timed_calls=args.calls, page=args.page),
        ratios=ratios, table=table)
    print(json.dumps(bars))
    name = "scale_smoke.json" if args.smoke else "scale.json"  # a CPU smoke never overwrites GPU results
    for d in ("benchmarks/results", os.environ.get("OUT")):
        if d:
            _merge_write(os.path.join(d, name), section, bars)


def _merge_write(path: str, section: dict, bars: dict) -> None:
    """scale.json is shared with the router simulation: keep its keys, replace ours."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
    data.update({k: section[k] for k in ("command", "device", "date", "git_commit")})
    data.setdefault("table", section["table"])  # the router script may own the top-level table
    data["tensor_and_data_parallel"] = section
    data["bars"] = {**data.get("bars", {}), **bars}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)


if __name__ == "__main__":
    main()
