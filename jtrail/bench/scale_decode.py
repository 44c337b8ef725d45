"""Decode throughput beyond one chip (`benchmarks/scale.py`): a TP=N replica of the Llama model with a
paged (or contiguous) KV cache pre-filled to ctx, greedy multi-step decode in one jitted call
(lax.fori_loop, as the engine runs it), and the TP=1 / TP=2 / two-replica configurations timed side
by side. JAX is imported here: a CPU smoke run sets XLA_FLAGS (fake devices) before importing this."""

from __future__ import annotations

import gc
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jtrail.models.attention import ContiguousMeta, contiguous_cache_attention
from jtrail.models.config import named_config
from jtrail.models.llama import Llama
from jtrail.models.sharding import init_sharded, kv_sharding, make_mesh, shard_attention_fn
from jtrail.serving.engine.step_programs import PagedMeta, make_paged_attention

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
