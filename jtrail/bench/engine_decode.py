"""Engine decode measurements of `benchmarks/engine.py`: decode tokens/s of a real `LLMEngine` against
the HBM roofline (bytes per token step / measured copy bandwidth), its host gap, the prefill burst,
real-model throughput, issue 16's rows and bars, and the transformers peer (run in its own process).

Decode: B requests with `ctx`-token contexts are placed in the engine as already prefilled (pages
allocated, lengths set; the KV pages hold zeros, which does not change the work), then
`engine.step()` runs `steps` times. Host gap: 1 - (device time of the jitted decode call alone, same
inputs) / (engine step wall time). Imports of jtrail's product are made inside the functions: with
`JTRAIL_BENCH_ROOT` the script measures a baseline tree with today's measuring code.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path


def wait_in_flight(engine) -> None:
    """Wait until the engine's steps in flight (async scheduling) have run on the device. A handle is
    the runner's: a future of the launched calls where the runner issues them from a thread."""
    handle = engine.newest_in_flight()
    if handle is not None:
        import jax  # this module imports JAX late (the CLI's argument errors come first)

        jax.block_until_ready(handle.result() if hasattr(handle, "result") else handle)


def hf_peer(shape: str, batches: list[int], ctx: int, new_tokens: int) -> dict:
    """Runs in its own process: transformers generate, random bf16 weights on the GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jtrail.models.config import NAMED_CONFIGS

    c = NAMED_CONFIGS[shape]
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                         num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                         max_position_embeddings=c.max_model_len, tie_word_embeddings=c.tie_embeddings)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_cfg).eval()
    out = {}
    for b in batches:
        ids = torch.randint(3, c.vocab_size, (b, ctx), device="cuda")

        def gen(n, ids=ids):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        gen(2)  # warm-up
        t1, tn = gen(1), gen(new_tokens + 1)
        out[str(b)] = {"decode_tokens_per_s": b * new_tokens / (tn - t1), "prefill_s": t1}
        torch.cuda.empty_cache()
    return out


def copy_bandwidth(jax, jnp, nbytes: int) -> float:
    """Bytes/s of a preallocated elementwise bf16 op (reads + writes), the measured ceiling."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    # `+ 1` is never simplified away (a bf16 multiply by ~1.0 rounds to 1.0 and XLA drops it, which
    # made an earlier run report 81 TB/s).
    f = jax.jit(lambda a: a + jnp.bfloat16(1), donate_argnums=0)
    x = f(x).block_until_ready()
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        x = f(x)
    x.block_until_ready()
    return 2 * nbytes * n / (time.perf_counter() - t0)


def engine_classes():
    """(EngineConfig, LLMEngine) from today's tree or from a baseline worktree from before issue 16,
    where the engine was one module (`jtrail.serving.engine`)."""
    try:
        from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
    except ModuleNotFoundError:  # the baseline tree's layout
        from jtrail.serving.engine import EngineConfig, LLMEngine
    return EngineConfig, LLMEngine


def decode_call(runner, tokens, positions, n_valid, tables, samp):
    """A no-argument function making one jitted decode call with these inputs: named inputs today,
    positional arrays in the baseline tree (resolved once, outside the timed loop)."""
    try:
        from jtrail.serving.engine.step_inputs import DecodeInputs
    except ModuleNotFoundError:
        return lambda: runner.decode(tokens, positions, n_valid, tables, samp)
    inputs = DecodeInputs(tokens=tokens, positions=positions, n_valid=n_valid, block_tables=tables, samp=samp)
    return lambda: runner.decode(inputs)


def place_prefilled(engine, b: int, ctx: int, max_tokens: int, rng) -> None:
    """B running sequences whose first ctx-1 tokens count as computed (decode starts at once).
    Works on the engine before issue 16 (a baseline worktree) and after."""
    from jtrail.serving.sequence import SamplingParams

    now = time.monotonic()
    for i in range(b):
        seq = engine.add_request(f"b{i}", rng.integers(3, engine.model_cfg.vocab_size, ctx).tolist(),
                                 SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        assert getattr(engine, "scheduler", engine)._admit(seq, now), "KV cache too small for the batch"
        seq.num_computed_tokens = ctx - 1
        if hasattr(engine, "_reqs"):
            engine._reqs[seq.request_id].prefilled = True
        else:
            engine._prefilled.add(seq.request_id)


def bench_prefill_burst(model, args, n: int = 64, plen: int = 512) -> dict:
    """n prompts of plen tokens submitted at once (max_tokens 1): seconds until the last first
    token, after a warm-up burst that compiles every shape."""
    import numpy as np

    from jtrail.serving.sequence import SamplingParams

    EngineConfig, LLMEngine = engine_classes()
    budget = args.burst_budget
    buckets = tuple(plen << i for i in range(6) if plen << i <= budget) or (budget,)
    pages = n * -(-(plen + 16) // args.page_size) + 1
    ecfg = EngineConfig(num_slots=n, page_size=args.page_size, num_pages=pages,
                        max_model_len=plen + 16, prefill_buckets=buckets, max_prefill_tokens_per_step=budget,
                        kernel_impl=args.impl, max_queue=2 * n)
    engine = LLMEngine(model, config=ecfg)
    rng = np.random.default_rng(2)
    params = SamplingParams(max_tokens=1, ignore_eos=True)

    def burst(tag: str) -> tuple[float, int]:
        for i in range(n):
            prompt = rng.integers(3, engine.model_cfg.vocab_size, plen).tolist()
            engine.add_request(f"{tag}{i}", prompt, params)
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return time.perf_counter() - t0, steps

    burst("warm")
    wall, steps = burst("timed")
    return {"prompts": n, "prompt_tokens": plen, "max_prefill_tokens_per_step": budget,
            "prefill_buckets": list(buckets), "last_first_token_s": wall, "steps": steps}


def bench_decode(model, cfg, b: int, args, bw: float) -> dict:
    import jax
    import numpy as np

    EngineConfig, LLMEngine = engine_classes()
    k, steps, page = args.decode_steps, args.steps, args.page_size
    # the engine's default unless the caller says (--async-compare measures both); always explicit to
    # the config, since the timed window below differs; the baseline worktree's config has no field
    has_field = "async_scheduling" in getattr(EngineConfig, "__dataclass_fields__", {})
    async_on = bool(getattr(args, "async_scheduling", has_field and EngineConfig.async_scheduling))
    calls = steps + 2 + async_on  # async: one more untimed step (see below)
    max_len = args.ctx + k * calls + page
    pages = b * -(-max_len // page) + 1
    extra = {"async_scheduling": async_on} if has_field else {}
    ecfg = EngineConfig(num_slots=b, page_size=page, num_pages=pages, max_model_len=max_len,
                        decode_steps_per_call=k, kernel_impl=args.impl, max_queue=b + 1, **extra)
    engine = LLMEngine(model, config=ecfg)
    place_prefilled(engine, b, args.ctx, k * calls, np.random.default_rng(0))
    t0 = time.perf_counter()
    engine.step()  # compile + first call
    if async_on:  # the second step compiles the token feed; from here on a step is always in flight:
        engine.step()  # the timed window starts and ends with none running on the device
        wait_in_flight(engine)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if async_on:  # every step dispatched in the window done; the last one's tokens not yet processed
        wait_in_flight(engine)
    wall = time.perf_counter() - t0
    toks = b * k * steps
    # device time of the jitted call alone: same shapes, inputs prepared once, back to back
    r = engine.runner
    rows = [s for s in engine.running]
    tokens = np.zeros(b, np.int32)
    positions = np.zeros(b, np.int32)
    n_valid = np.full(b, k, np.int32)
    tables = np.zeros((b, r.max_pages_per_seq), np.int32)
    for s in rows:
        positions[s.slot] = s.num_tokens - 1
        tables[s.slot, :len(s.block_table)] = s.block_table
    samp = engine._sampling_rows([None] * b, k)
    call = decode_call(r, tokens, positions, n_valid, tables, samp)
    out, _ = call()
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out, _ = call()
    jax.block_until_ready(out)
    device = (time.perf_counter() - t0) / steps
    step_wall = wall / steps
    avg_ctx = args.ctx + k * (steps + 1) / 2
    weight_bytes = (cfg.num_params - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)) * 2
    kv_bytes = b * avg_ctx * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2
    roofline_tps = b / ((weight_bytes + kv_bytes) / bw)
    # the runner's resolved choices (an older commit's runner, timed as a baseline, has neither)
    graphs, thread = getattr(r, "decode_graphs", 1), getattr(r, "launch_thread", False)
    depth = getattr(engine, "steps_in_flight", int(async_on))
    del engine, r, out
    gc.collect()  # free this batch size's KV cache before the next one is allocated
    return {"batch": b, "ctx": args.ctx, "tokens_per_s": toks / wall, "roofline_tokens_per_s": roofline_tps,
            "roofline_fraction": toks / wall / roofline_tps, "step_wall_ms": step_wall * 1e3,
            "device_call_ms": device * 1e3, "host_gap_fraction": max(0.0, 1 - device / step_wall),
            "compile_s": compile_s, "decode_steps_per_call": k, "timed_steps": steps,
            "async_scheduling": async_on, "decode_graphs": graphs, "launch_thread": thread,
            "steps_in_flight": depth}


def bench_smollm2(path: str, args) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from jtrail.models.loader import load_model
    from jtrail.serving.sequence import SamplingParams

    EngineConfig, LLMEngine = engine_classes()
    lm = load_model(path, dtype=jnp.bfloat16, progress=False)
    b, plen, gen = args.smollm2_batch, 256, 128
    pages = b * (plen + gen) // args.page_size + 64
    ecfg = EngineConfig(num_slots=b, page_size=args.page_size, num_pages=pages,
                        max_model_len=plen + gen + 16, prefill_buckets=(256, 512, 1024),
                        max_prefill_tokens_per_step=4096, decode_steps_per_call=args.decode_steps,
                        kernel_impl=args.impl)
    engine = LLMEngine(lm.model, lm.tokenizer, ecfg)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, lm.cfg.vocab_size, plen).tolist() for _ in range(b)]
    params = SamplingParams(max_tokens=gen, ignore_eos=True)
    from jtrail.llm import generate_batch

    generate_batch(engine, prompts[:2], SamplingParams(max_tokens=2 * args.decode_steps + 1), progress=False)
    t0 = time.perf_counter()
    generate_batch(engine, prompts, params, progress=False)
    wall = time.perf_counter() - t0
    return {"batch": b, "prompt_tokens": plen, "new_tokens": gen, "wall_s": wall,
            "output_tokens_per_s": b * gen / wall, "note": "end to end incl. prefill, bf16"}


# issue 16's rows: key -> (batch, decode tokens per call); --smoke runs tiny ones under the same keys
ISSUE16_ROWS = {"b32_k1": (32, 1), "b128_k1": (128, 1), "b128_k8": (128, 8)}
SMOKE_ROWS = {"b32_k1": (2, 1), "b128_k1": (4, 1), "b128_k8": (4, 2)}
TOKENS_PER_SEQ = 256  # timed decode tokens per sequence in every row (steps = 256 / tokens per call;
# 64 until 2026-12-03, when same-process repeats of 150 steps still moved by 10-30% on the H200 host)
# the roofline row: the default run's Llama-3-8B settings at batch 128 (shape, batch, ctx, k, steps)
ROOFLINE_ROW = ("llama3-8b", 128, 1024, 8, 8)
SMOKE_ROOFLINE_ROW = ("tiny", 4, 48, 2, 3)


def bench_roofline(args, bw: float) -> dict:
    import jax.numpy as jnp

    from jtrail.models.config import NAMED_CONFIGS
    from jtrail.models.loader import random_model

    shape, b, ctx, k, steps = SMOKE_ROOFLINE_ROW if args.smoke else ROOFLINE_ROW
    cfg = NAMED_CONFIGS[shape]
    model = random_model(cfg, jnp.bfloat16)
    a = argparse.Namespace(**{**vars(args), "ctx": ctx, "decode_steps": k, "steps": steps})
    row = {"shape": shape, **bench_decode(model, cfg, b, a, bw)}
    del model
    gc.collect()
    return row


def run_issue16(args, model, cfg, bw: float) -> dict:
    """The SmolLM2 rows, then (unless --rows-only) the prefill burst and the roofline row."""
    rows = {}
    for key, (b, k) in (SMOKE_ROWS if args.smoke else ISSUE16_ROWS).items():
        if args.rows_only and not key.endswith("_" + args.rows_only):
            continue
        steps = args.steps if args.smoke else TOKENS_PER_SEQ // k
        a = argparse.Namespace(**{**vars(args), "decode_steps": k, "steps": steps})
        rows[key] = bench_decode(model, cfg, b, a, bw)
        print(json.dumps(rows[key]), flush=True)
    if args.rows_only:
        return {"rows": rows, "prefill_burst": None, "roofline": None}
    burst = bench_prefill_burst(model, args, n=8, plen=64) if args.smoke else bench_prefill_burst(model, args)
    print(json.dumps(burst), flush=True)
    # the baseline skips the Llama-3-8B row: the bar is on the change's own roofline fraction
    roofline = None if args.skip_roofline else bench_roofline(args, bw)
    print(json.dumps(roofline), flush=True)
    return {"rows": rows, "prefill_burst": burst, "roofline": roofline}


def k1_summary(rows: dict) -> dict:
    fields = ("tokens_per_s", "device_call_ms", "host_gap_fraction")
    return {key: {f: row[f] for f in fields} for key, row in rows.items() if key.endswith("_k1")}


def issue16_bars(after: dict, before: dict | None) -> dict:
    r = after["rows"]
    bars = {"smollm2_b32_tokens_per_s": r["b32_k1"]["tokens_per_s"],
            "smollm2_b128_tokens_per_s": r["b128_k1"]["tokens_per_s"],
            "smollm2_b128_k8_tokens_per_s": r["b128_k8"]["tokens_per_s"],
            "smollm2_host_gap_b32": r["b32_k1"]["host_gap_fraction"],
            "roofline_fraction_b128": after["roofline"]["roofline_fraction"],
            "speedup_vs_before_b32": None, "prefill_burst_speedup": None,
            "prefill_burst_last_first_token_s": after["prefill_burst"]["last_first_token_s"]}
    if before is not None:
        b = before["rows"]
        bars["speedup_vs_before_b32"] = r["b32_k1"]["tokens_per_s"] / b["b32_k1"]["tokens_per_s"]
        bars["speedup_vs_before_b128"] = r["b128_k1"]["tokens_per_s"] / b["b128_k1"]["tokens_per_s"]
        bars["speedup_vs_before_b128_k8"] = r["b128_k8"]["tokens_per_s"] / b["b128_k8"]["tokens_per_s"]
        bars["prefill_burst_speedup"] = (before["prefill_burst"]["last_first_token_s"]
                                         / after["prefill_burst"]["last_first_token_s"])
        if before.get("roofline"):
            bars["roofline_fraction_b128_before"] = before["roofline"]["roofline_fraction"]
    return bars


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


def write_result(result: dict, out: str, out_dir: str | None, name: str) -> None:
    """The result to `out`, and a copy into `out_dir` (the device machine's $OUT) when set. Each file
    is replaced whole (written aside, then renamed): a run killed mid-write leaves the last one."""
    text = json.dumps(result, indent=2)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for path in [Path(out)] + ([Path(out_dir, name)] if out_dir else []):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
