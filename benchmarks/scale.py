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
import time

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jtrail.models.attention import ContiguousMeta, contiguous_cache_attention  # noqa: E402
from jtrail.models.config import named_config  # noqa: E402
from jtrail.models.llama import Llama  # noqa: E402
from jtrail.models.sharding import (  # noqa: E402
    init_sharded,
    kv_sharding,
    make_mesh,
    shard_attention_fn,
)
from jtrail.serving.engine.model_runner import PagedMeta, make_paged_attention  # noqa: E402

from jtrail.provenance import git_commit

ATTN_DESC = {"paged": "serving engine's make_paged_attention -> kernels.ops, Pallas on GPU",
             "contiguous": "models.attention.contiguous_cache_attention, plain jnp"}


class Replica:
    """One model + KV cache on a mesh (TP = mesh size), with a jitted multi-step greedy decode."""

    def __init__(self, cfg, mesh, batch: int, max_len: int, steps: int, dtype, attention: str, page: int):
        self.batch, self.steps, self.page = batch, steps, page
        self.model = init_sharded(lambda: Llama(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)), mesh)
        graphdef, self.state = nnx.split(self.model)
        tp = mesh.devices.size
        pps = -(-max_len // page)
        if attention == "paged":
            shape, layout = (cfg.n_kv_heads, 1 + batch * pps, page, cfg.head_dim), "paged"
            base = make_paged_attention("auto")
        else:
            shape, layout = (batch, pps * page, cfg.n_kv_heads, cfg.head_dim), "contiguous"
            base = contiguous_cache_attention
        attn = base if tp == 1 else shard_attention_fn(base, mesh, layout)
        sh = kv_sharding(mesh, layout)
        self.caches = [(jnp.zeros(shape, dtype, device=sh), jnp.zeros(shape, dtype, device=sh))
                       for _ in range(cfg.n_layers)]
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.tables = jax.device_put(1 + jnp.arange(batch * pps, dtype=jnp.int32).reshape(batch, pps), rep)
        self.tokens = jax.device_put(jnp.ones((batch,), jnp.int32), rep)

        def run(state, caches, tokens, pos0, tables):
            model = nnx.merge(graphdef, state)

            def one(j, carry):
                caches, tok = carry
                pos = jnp.full((batch,), pos0 + j, jnp.int32)
                if layout == "paged":
                    slot = tables[jnp.arange(batch), pos // page] * page + pos % page
                    meta = PagedMeta(slot, tables, pos, jnp.ones((batch,), jnp.int32))
                else:
                    meta = ContiguousMeta(pos[:, None])
                out = model(tok[:, None], pos[:, None], caches, attn, meta, logits_index=jnp.zeros_like(tok))
                return out.caches, jnp.argmax(out.logits, -1).astype(jnp.int32)

            return jax.lax.fori_loop(0, steps, one, (caches, tokens))

        self._run = jax.jit(run, donate_argnums=(1,))

    def dispatch(self, pos0: int) -> None:
        self.caches, self.tokens = self._run(self.state, self.caches, self.tokens, jnp.int32(pos0),
                                             self.tables)


def measure(replicas: list[Replica], ctx: int, calls: int) -> dict:
    """Warm up (compile) then time `calls` multi-step calls on every replica at once."""
    for r in replicas:
        r.dispatch(ctx)
    jax.block_until_ready([r.tokens for r in replicas])
    t0 = time.perf_counter()
    for i in range(calls):
        for r in replicas:  # async dispatch: replicas on different devices overlap
            r.dispatch(ctx + (i + 1) * r.steps)
    jax.block_until_ready([r.tokens for r in replicas])
    dt = time.perf_counter() - t0
    toks = sum(r.batch * r.steps * calls for r in replicas)
    return {"seconds": dt, "tokens": toks, "tok_s": toks / dt,
            "step_ms": 1e3 * dt / (calls * replicas[0].steps)}


def run_config(args, cfg, dtype, attention: str, batch: int, tp_list) -> dict:
    """tp_list: one (tp, devices) per replica. Frees everything before returning."""
    max_len = args.ctx + args.steps * (args.calls + 1) + 1
    reps = [Replica(cfg, make_mesh(tp, devs), batch, max_len, args.steps, dtype, attention, args.page)
            for tp, devs in tp_list]
    res = measure(reps, args.ctx, args.calls)
    del reps
    gc.collect()
    return res


def bench(args, attention: str) -> tuple[list[dict], dict]:
    cfg = named_config(args.model)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    d = jax.devices()
    table, by = [], {}

    def row(name, batch, tp, replicas, per_replica_batch, res):
        r = dict(config=name, total_batch=batch, tp=tp, replicas=replicas,
                 per_replica_batch=per_replica_batch, ctx=args.ctx, **res)
        table.append(r)
        by[name, batch] = r
        print(json.dumps(r), flush=True)

    for b in args.batches:
        row("tp1", b, 1, 1, b, run_config(args, cfg, dtype, attention, b, [(1, d[:1])]))
        row("tp2", b, 2, 1, b, run_config(args, cfg, dtype, attention, b, [(2, d[:2])]))
        row("replicas2", 2 * b, 1, 2, b, run_config(args, cfg, dtype, attention, b,
                                                     [(1, d[:1]), (1, d[1:2])]))
    bmax = max(args.batches)
    row("replicas2_split", bmax, 1, 2, bmax // 2,
        run_config(args, cfg, dtype, attention, bmax // 2, [(1, d[:1]), (1, d[1:2])]))
    ratios = {f"tp2_over_tp1_b{b}": by["tp2", b]["tok_s"] / by["tp1", b]["tok_s"] for b in args.batches}
    ratios.update({f"replicas2_over_1_b{b}": by["replicas2", 2 * b]["tok_s"] / by["tp1", b]["tok_s"]
                   for b in args.batches})
    split = by["replicas2_split", bmax]["tok_s"] / by["tp1", bmax]["tok_s"]
    ratios[f"replicas2_split_over_1_b{bmax}"] = split
    return table, ratios


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
