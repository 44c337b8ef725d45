"""Where a SmolLM2-135M decode step's time goes (issue 16): host per beat, dispatch, device ablations.

    python -m jtrail.bench.step_breakdown LABEL [--only-device | --host-only] [--no-sweep]
                                                  # -> $OUT/diag16_LABEL.json

Random weights, ctx 512, batch 32 and 128, one token per call.
1. The engine's step loop, sync and async, each beat timed: schedule, runner.execute (input
   preparation + dispatch), fetch (wait for the device + copy back), output processing; then the
   decode call alone: its dispatch (median time for the call to return, the device idle before it)
   and back to back (device-bound when dispatch is shorter); one small host-to-device and
   device-to-host copy.
2. Device time of the decode call with one part replaced at a time. These are ablations, not
   products: the attention kernel by the identity, the KV write skipped, sampling by argmax,
   attention by the jnp reference.
3. The Pallas decode-attention kernel alone over split-K, pages per block and warps. Standalone
   calls are dispatch-bound on the H200 (~50 us), so they do not rank the variants.
Run it under other XLA_FLAGS for the command-buffer settings. The H200 run:
benchmarks/results/engine_breakdown.json; what it says: benchmarks/ENGINE_NOTES.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jtrail.bench.engine_decode import place_prefilled
from jtrail.kernels import ops
from jtrail.kernels import paged_attention_gpu as pag
from jtrail.models.config import named_config
from jtrail.models.loader import random_model
from jtrail.serving.engine import step_inputs
from jtrail.serving.engine import step_programs as sp
from jtrail.serving.engine.config import EngineConfig
from jtrail.serving.engine.llm_engine import LLMEngine

CPU = jax.default_backend() == "cpu"  # a CPU run checks the script: 4 tiny layers, batch 8
CFG = (dataclasses.replace(named_config("tiny"), n_layers=4, vocab_size=512) if CPU
       else named_config("smollm2-135m"))
BATCHES = (8,) if CPU else (32, 128)


def make_engine(model, b: int, asyn: bool, steps: int = 300, **config) -> LLMEngine:
    """B requests placed as prefilled at ctx 512 (32 on CPU); `config`: other EngineConfig fields."""
    ctx, page = (32 if CPU else 512), 16
    max_len = ctx + steps + 40
    ecfg = EngineConfig(kernel_impl="reference" if CPU else "auto", num_slots=b, page_size=page,
                        num_pages=b * (max_len // page + 2) + 1, max_model_len=max_len, max_queue=b + 1,
                        async_scheduling=asyn, **config)
    engine = LLMEngine(model, config=ecfg)
    place_prefilled(engine, b, ctx, steps + 20, np.random.default_rng(0))
    return engine


def timed(f: Callable[[], object], n: int) -> float:
    """Seconds per call of n back-to-back calls, the device drained at both ends."""
    jax.block_until_ready(f())
    t0 = time.perf_counter()
    for _ in range(n):
        out = f()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def decode_inputs(engine: LLMEngine) -> step_inputs.DecodeInputs:
    b, r = engine.config.num_slots, engine.runner
    positions, tables = np.zeros(b, np.int32), np.zeros((b, r.max_pages_per_seq), np.int32)
    for q in engine.running:
        positions[q.slot] = q.num_tokens - 1
        tables[q.slot, :len(q.block_table)] = q.block_table
    return step_inputs.DecodeInputs(tokens=np.zeros(b, np.int32), positions=positions,
                                    n_valid=np.ones(b, np.int32), block_tables=tables,
                                    samp=engine._sampling_rows([None] * b, 1))


def host_breakdown(model, b: int, asyn: bool, n: int = 150) -> dict:
    engine = make_engine(model, b, asyn)
    for _ in range(5):
        engine.step()
    acc = dict.fromkeys(("schedule", "execute", "fetch", "process"), 0.0)

    def timing(f: Callable, key: str) -> Callable:
        def wrapped(*a, **kw):
            t = time.perf_counter()
            out = f(*a, **kw)
            acc[key] += time.perf_counter() - t
            return out
        return wrapped

    for obj, name in ((engine.scheduler, "schedule"), (engine.runner, "execute"), (engine.runner, "fetch"),
                      (engine.outputs, "process")):
        setattr(obj, name, timing(getattr(obj, name), name))
    t0 = time.perf_counter()
    for _ in range(n):
        engine.step()
    wall = time.perf_counter() - t0
    row = {"step_ms": wall / n * 1e3, **{k: v / n * 1e3 for k, v in acc.items()},
           "tokens_per_s": b * n / wall}
    r, x = engine.runner, decode_inputs(engine)
    returns = []
    for _ in range(30):
        jax.block_until_ready(r.caches)
        t = time.perf_counter()
        out = r.decode(x)
        returns.append(time.perf_counter() - t)
    jax.block_until_ready(out)
    row["dispatch_ms"] = float(np.median(returns)) * 1e3
    row["device_ms"] = timed(lambda: r.decode(x), 100) * 1e3
    small, ts = np.zeros(b, np.int32), []
    for _ in range(50):
        t = time.perf_counter()
        y = jax.device_put(small)
        ts.append(time.perf_counter() - t)
    row["device_put_small_ms"] = float(np.median(ts)) * 1e3
    ts = []
    for _ in range(50):
        y = jax.block_until_ready(jax.device_put(small))
        t = time.perf_counter()
        np.asarray(y)
        ts.append(time.perf_counter() - t)
    row["device_get_small_ms"] = float(np.median(ts)) * 1e3
    return row


def _identity_attention(q, k_pages, v_pages, lengths, block_tables, impl="auto"):
    return q


def _no_kv_write(k_pages, v_pages, k, v, slots, impl="auto"):
    return k_pages, v_pages


def _argmax(logits, keys, temperature, top_p, top_k, filtered=True):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


ABLATIONS: dict[str, dict] = {
    "base": {},
    "greedy_sampling": {"sample": _argmax},
    "reference_attention": {"impl": "reference"},
    "no_attention_kernel": {"attention": _identity_attention},
    "no_attention_no_write": {"attention": _identity_attention, "write": _no_kv_write},
    "no_attn_no_write_greedy": {"attention": _identity_attention, "write": _no_kv_write, "sample": _argmax},
}


def device_ablations(engine: LLMEngine) -> dict[str, float | str]:
    r, x = engine.runner, decode_inputs(engine)
    originals = ops.decode_attention, ops.write_kv, sp.sample_tokens
    out: dict[str, float | str] = {}
    for name, change in ABLATIONS.items():
        ops.decode_attention = change.get("attention", originals[0])
        ops.write_kv = change.get("write", originals[1])
        sp.sample_tokens = change.get("sample", originals[2])
        statics = r.statics
        if "impl" in change:
            r.statics = sp.intern_statics(dataclasses.replace(statics, impl=change["impl"]))
        jax.clear_caches()  # the jitted step traces again with the replaced part
        try:
            out[name] = timed(lambda: r.decode(x), 100) * 1e3
        except Exception as e:  # noqa: BLE001 - a variant that fails is recorded, not fatal
            out[name] = repr(e)[:300]
        finally:
            r.statics = statics
            ops.decode_attention, ops.write_kv, sp.sample_tokens = originals
    jax.clear_caches()
    return out


def kernel_sweep(engine: LLMEngine) -> dict[str, float | str]:
    b, r, x = engine.config.num_slots, engine.runner, decode_inputs(engine)
    q = jax.random.normal(jax.random.PRNGKey(0), (b, CFG.n_heads, CFG.head_dim), jnp.bfloat16)
    k_pages, v_pages = r.caches[0]
    lengths, tables = jnp.asarray(x.positions + 1), jnp.asarray(x.block_tables)
    out: dict[str, float | str] = {}
    for splits in (1, 2, 4, 8):
        for ppb in (1, 2, 4):
            for warps in (1, 2):
                kw = {"num_splits": splits, "pages_per_block": ppb, "num_warps": warps}
                try:
                    out[f"s{splits}_ppb{ppb}_w{warps}"] = timed(
                        lambda kw=kw: pag.decode_attention_pallas(q, k_pages, v_pages, lengths, tables, **kw),
                        200) * 1e6
                except Exception as e:  # noqa: BLE001
                    out[f"s{splits}_ppb{ppb}_w{warps}"] = repr(e)[:200]
    out["auto"] = timed(lambda: pag.decode_attention_pallas(q, k_pages, v_pages, lengths, tables), 200) * 1e6
    return out


def main(argv: list[str]) -> None:
    label = argv[0] if argv and not argv[0].startswith("--") else "default"
    res: dict = {"label": label, "xla_flags": os.environ.get("XLA_FLAGS", ""), "device_ms": {}}
    model = random_model(CFG, seed=0)
    if "--only-device" not in argv:
        for b in BATCHES:
            for asyn in (False, True):
                key = f"host_b{b}_{'async' if asyn else 'sync'}"
                res[key] = host_breakdown(model, b, asyn)
                print(label, key, json.dumps(res[key]), flush=True)
    for b in () if "--host-only" in argv else BATCHES:
        engine = make_engine(model, b, False)
        for _ in range(3):
            engine.step()
        for name, ms in device_ablations(engine).items():
            res["device_ms"][f"b{b}_{name}"] = ms
            print(label, b, name, ms, flush=True)
        if not CPU and "--no-sweep" not in argv:
            res["device_ms"][f"b{b}_attention_kernel_us"] = kernel_sweep(engine)
            print(label, b, json.dumps(res["device_ms"][f"b{b}_attention_kernel_us"]), flush=True)
    path = os.path.join(os.environ.get("OUT") or ".", f"diag16_{label}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
