"""Engine decode throughput vs the HBM roofline and vs Hugging Face transformers.

    python benchmarks/engine.py               # GPU: Llama-3-8B shape, random bf16 weights
    python benchmarks/engine.py --smoke       # CPU: tiny shapes, checks the script end to end
    python benchmarks/engine.py --smollm2-gguf PATH   # adds real-model (SmolLM2) end-to-end throughput
    python benchmarks/engine.py --issue16 --baseline-worktree DIR   # issue 16's bars, before vs after
    python benchmarks/engine.py --async-compare   # sync vs async scheduling -> results/engine_async.json

--issue16: SmolLM2-135M shape, ctx 512, batch 32 and 128 at one token per call and batch 128 at 8
(64 tokens per sequence each: 64 timed steps at one token per call, 8 at eight), the prefill burst
(64 prompts of 512 tokens at once, max_tokens 1: seconds from submission to the last first token),
and the Llama-3-8B shape at batch 128 (ctx 1024, 8 tokens per call, 8 steps: the roofline row of the
default run). With --baseline-worktree DIR (a checkout of the commit before the change, e.g.
`git archive f6c35c1 jtrail serving models kernels | tar -x -C DIR`), the same measurements run first
in a subprocess that imports jtrail from DIR, and the result holds both and their ratios. Then, unless
--command-buffers none, the SmolLM2 rows at one token per call run once more per XLA command-buffer
(CUDA graph) setting, each in a subprocess with its XLA_FLAGS ("off": none; "all": every command
type, loops included, graphs of any size); the main run is XLA's default. All weights are random
(the real GGUF is not needed). All subprocesses run before this process touches the GPU.

Decode measurement: for each batch size B, B requests with `ctx`-token contexts are placed in the
engine as already prefilled (pages allocated, lengths set; the KV pages hold zeros, which does not
change the work), then `engine.step()` runs `--steps` times, each a jitted call of
`decode_steps_per_call` tokens per sequence. tokens/s = B * tokens per sequence / wall time of the
step loop. Roofline: bytes read per token step (all weights except the embedding table, plus every
sequence's KV) / copy bandwidth measured in this run (preallocated elementwise bf16 op). Host gap:
1 - (device time of the jitted decode call alone, same inputs) / (engine step wall time).
The transformers peer runs in a subprocess before JAX touches the GPU (JAX preallocates memory):
decode tokens/s = B * N / (time of generate(N+1 new tokens) - time of generate(1 new token)).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _mount_jtrail(root: str) -> None:
    """Import jtrail from a source tree (jtrail/, serving/, models/, kernels/ side by side, as the
    repo and a baseline `git archive` lay them out) without installing it."""
    import importlib.util

    def pkg(name: str, path: str):
        spec = importlib.util.spec_from_file_location(name, path + "/__init__.py",
                                                      submodule_search_locations=[path])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        return spec, mod

    root_spec, root_mod = pkg("jtrail", root + "/jtrail")
    subs = {s: pkg("jtrail." + s, f"{root}/{s}") for s in ("kernels", "models", "serving")}
    for s, (_, mod) in subs.items():
        setattr(root_mod, s, mod)
    for spec, mod in subs.values():
        spec.loader.exec_module(mod)
    root_spec.loader.exec_module(root_mod)


# JTRAIL_BENCH_ROOT: the tree to measure (the baseline subprocess sets it). Otherwise the installed
# jtrail, or this repo's tree when none is installed (a copy on a lent GPU).
if os.environ.get("JTRAIL_BENCH_ROOT"):
    _mount_jtrail(str(Path(os.environ["JTRAIL_BENCH_ROOT"]).resolve()))
else:
    try:
        import jtrail  # noqa: F401
    except ImportError:
        _mount_jtrail(str(Path(__file__).resolve().parent.parent))

from jtrail.provenance import git_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"


def hf_peer(shape: str, batches: list[int], ctx: int, new_tokens: int) -> dict:
    """Runs in its own process: transformers generate, random bf16 weights on the GPU."""
    import torch
    from jtrail.models.config import NAMED_CONFIGS
    from transformers import LlamaConfig, LlamaForCausalLM

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


def run_hf_subprocess(args) -> dict | None:
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    cmd = [sys.executable, __file__, "--hf-peer-only", "--ctx", str(args.ctx), "--hf-new-tokens",
           str(args.hf_new_tokens), "--hf-batches", ",".join(map(str, args.hf_batches)),
           "--shape", args.shape]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print("transformers peer failed:\n", proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
    from jtrail.serving.sequence import SamplingParams

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
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine

    k, steps, page = args.decode_steps, args.steps, args.page_size
    async_on = getattr(args, "async_scheduling", False)
    calls = steps + 2 + async_on  # async: one more untimed step (see below)
    max_len = args.ctx + k * calls + page
    pages = b * -(-max_len // page) + 1
    extra = {"async_scheduling": True} if async_on else {}  # the baseline worktree's config has no field
    ecfg = EngineConfig(num_slots=b, page_size=page, num_pages=pages, max_model_len=max_len,
                        decode_steps_per_call=k, kernel_impl=args.impl, max_queue=b + 1, **extra)
    engine = LLMEngine(model, config=ecfg)
    place_prefilled(engine, b, args.ctx, k * calls, np.random.default_rng(0))
    t0 = time.perf_counter()
    engine.step()  # compile + first call
    if async_on:  # the second step compiles the token feed; from here on a step is always in flight:
        engine.step()  # the timed window starts and ends with none running on the device
        jax.block_until_ready(engine._in_flight[1])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if async_on:  # every step dispatched in the window done; the last one's tokens not yet processed
        jax.block_until_ready(engine._in_flight[1])
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
    out, _ = r.decode(tokens, positions, n_valid, tables, samp)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out, _ = r.decode(tokens, positions, n_valid, tables, samp)
    jax.block_until_ready(out)
    device = (time.perf_counter() - t0) / steps
    step_wall = wall / steps
    avg_ctx = args.ctx + k * (steps + 1) / 2
    weight_bytes = (cfg.num_params - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)) * 2
    kv_bytes = b * avg_ctx * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2
    roofline_tps = b / ((weight_bytes + kv_bytes) / bw)
    del engine, r, out
    gc.collect()  # free this batch size's KV cache before the next one is allocated
    return {"batch": b, "ctx": args.ctx, "tokens_per_s": toks / wall, "roofline_tokens_per_s": roofline_tps,
            "roofline_fraction": toks / wall / roofline_tps, "step_wall_ms": step_wall * 1e3,
            "device_call_ms": device * 1e3, "host_gap_fraction": max(0.0, 1 - device / step_wall),
            "compile_s": compile_s, "decode_steps_per_call": k, "timed_steps": steps,
            "async_scheduling": async_on}


def bench_smollm2(path: str, args) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from jtrail.models.loader import load_model
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
    from jtrail.serving.sequence import SamplingParams

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


def bench_mixed(model, args, async_on: bool, n: int, slots: int, probe=None) -> dict:
    """A serving-like workload through the engine: n requests at once, prompts of 16..plen_max tokens
    and 8..gen_max output tokens (greedy, fixed lengths), `slots` batch slots, one token per call;
    fcfs, or trail with `probe` (random weights: it ranks arbitrarily, but its probe-only prefills
    and refinements run). Timed after a warm-up pass over the same shapes."""
    import numpy as np
    from jtrail.serving.brain.predictor import TrailPredictor
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
    from jtrail.serving.sequence import SamplingParams

    plen_max, gen_max = (40, 24) if args.smoke else (1024, 512)
    max_len = plen_max + gen_max + 16
    pages = slots * -(-max_len // args.page_size) + 1
    buckets = (16, 32, 64) if args.smoke else (64, 128, 256, 512, 1024, 2048)
    ecfg = EngineConfig(num_slots=slots, page_size=args.page_size, num_pages=pages, max_model_len=max_len,
                        prefill_buckets=buckets, max_prefill_tokens_per_step=buckets[-1],
                        kernel_impl=args.impl, max_queue=2 * n, async_scheduling=async_on,
                        policy="trail" if probe is not None else "fcfs")
    pred = None
    if probe is not None:
        edges = np.linspace(0, gen_max, probe.cfg.num_bins + 1)
        pred = TrailPredictor(edges)
    engine = LLMEngine(model, config=ecfg, probe=probe, predictor=pred)
    rng = np.random.default_rng(3)
    vocab = engine.model_cfg.vocab_size
    work = [(rng.integers(3, vocab, int(rng.integers(16, plen_max))).tolist(),
             SamplingParams(max_tokens=int(rng.integers(8, gen_max)), ignore_eos=True)) for _ in range(n)]

    def once(tag: str) -> tuple[float, int, dict[str, list[int]]]:
        seqs = [engine.add_request(f"{tag}{i}", p, sp) for i, (p, sp) in enumerate(work)]
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return time.perf_counter() - t0, steps, {s.request_id[len(tag):]: s.output_ids for s in seqs}

    once("warm")
    wall, steps, outs = once("timed")
    toks = sum(len(v) for v in outs.values())
    return {"async_scheduling": async_on, "requests": n, "slots": slots, "probe": probe is not None,
            "wall_s": wall, "steps": steps, "steps_per_s": steps / wall, "output_tokens_per_s": toks / wall,
            "preemptions": engine.num_preemptions, "outputs": outs}


def run_async_compare(args, model, cfg, bw: float) -> dict:
    """Synchronous vs async scheduling on the same workloads, one process: the issue-16 decode rows
    (steps/s, tokens/s, host gap) and the mixed workload (with and without the trail probe); reports
    whether every request's greedy tokens match (bf16 on a GPU: a different batch composition may
    flip a near-tie, so a mismatch is counted, not fatal)."""
    from flax import nnx
    from jtrail.models.probe import ProbeConfig, ProbeHead

    rows: dict = {}
    for key, (b, k) in (SMOKE_ROWS if args.smoke else ISSUE16_ROWS).items():
        steps = args.steps if args.smoke else TOKENS_PER_SEQ // k
        for mode in (False, True):
            a = argparse.Namespace(**{**vars(args), "decode_steps": k, "steps": steps,
                                      "async_scheduling": mode})
            r = bench_decode(model, cfg, b, a, bw)
            r["steps_per_s"] = 1e3 / r["step_wall_ms"]
            rows[f"{key}_{'async' if mode else 'sync'}"] = r
            print(json.dumps({key: r}), flush=True)
        sync_tps, async_tps = rows[f"{key}_sync"]["tokens_per_s"], rows[f"{key}_async"]["tokens_per_s"]
        rows[f"{key}_async_speedup"] = async_tps / sync_tps
    n, slots = (12, 4) if args.smoke else (512, 128)
    probe = ProbeHead(ProbeConfig(d_model=cfg.d_model, layer=cfg.n_layers // 2, hidden=64), rngs=nnx.Rngs(0))
    mixed: dict = {}
    for name, pr in (("fcfs", None), ("trail_probe", probe)):
        sync = bench_mixed(model, args, False, n, slots, pr)
        asyn = bench_mixed(model, args, True, n, slots, pr)
        same = sum(sync["outputs"][r] == asyn["outputs"][r] for r in sync["outputs"])
        for r in (sync, asyn):
            r.pop("outputs")
        mixed[name] = {"sync": sync, "async": asyn, "requests_same_tokens": same, "requests": n,
                       "async_speedup_wall": sync["wall_s"] / asyn["wall_s"]}
        print(json.dumps({name: mixed[name]}), flush=True)
    return {"decode_rows": rows, "mixed": mixed}


# issue 16's rows: key -> (batch, decode tokens per call); --smoke runs tiny ones under the same keys
ISSUE16_ROWS = {"b32_k1": (32, 1), "b128_k1": (128, 1), "b128_k8": (128, 8)}
SMOKE_ROWS = {"b32_k1": (2, 1), "b128_k1": (4, 1), "b128_k8": (4, 2)}
TOKENS_PER_SEQ = 64  # timed decode tokens per sequence in every row (steps = 64 / tokens per call)
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
    roofline = bench_roofline(args, bw)
    print(json.dumps(roofline), flush=True)
    return {"rows": rows, "prefill_burst": burst, "roofline": roofline}


def _issue16_subprocess(args, out: Path, extra: list[str], env: dict[str, str], timeout: int = 900) -> None:
    cmd = [sys.executable, __file__, "--issue16", "--no-hf", "--out", str(out), "--ctx", str(args.ctx),
           "--impl", args.impl, "--page-size", str(args.page_size), "--burst-budget", str(args.burst_budget),
           "--command-buffers", "none", *extra]
    if args.smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, text=True, env={**os.environ, "OUT": "", **env}, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra) or 'subprocess'} failed (rc {proc.returncode})")


def run_baseline(args) -> dict:
    """The same measurements with jtrail imported from the baseline worktree (own process: its own
    JAX, its own compile caches); runs before this process touches the GPU."""
    import tempfile

    base = str(Path(args.baseline_worktree).resolve())
    for d in ("jtrail", "serving", "models", "kernels"):
        if not Path(base, d, "__init__.py").exists():
            raise SystemExit(f"--baseline-worktree {base}: no {d}/__init__.py "
                             "(need jtrail, serving, models, kernels)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "baseline.json")
        try:
            _issue16_subprocess(args, out, [], {"JTRAIL_BENCH_ROOT": base})
        except RuntimeError as e:
            raise SystemExit(f"baseline run failed: {e}") from None
        return json.loads(out.read_text())


# XLA command buffers (CUDA graphs) for the decode step; the main run keeps XLA's default.
COMMAND_BUFFERS = {
    "off": "--xla_gpu_enable_command_buffer=",
    "all": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL "
           "--xla_gpu_graph_min_graph_size=1",
}


def run_command_buffer_variants(args) -> dict:
    """SmolLM2 at one token per call (batch 32 and 128) under each command-buffer setting; a setting
    that fails is recorded, not fatal."""
    import tempfile

    names = [] if args.command_buffers == "none" else args.command_buffers.split(",")
    out: dict = {}
    for name in names:
        if name not in COMMAND_BUFFERS:
            raise SystemExit(f"--command-buffers: unknown setting {name!r} "
                             f"(known: {sorted(COMMAND_BUFFERS)})")
        flags = (os.environ.get("XLA_FLAGS", "") + " " + COMMAND_BUFFERS[name]).strip()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, f"cmdbuf_{name}.json")
            try:
                # a setting that hangs must not eat the whole run: two rows take well under a minute
                _issue16_subprocess(args, path, ["--rows-only", "k1"], {"XLA_FLAGS": flags}, timeout=240)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                out[name] = {"xla_flags": flags, "error": str(e)}
                continue
            res = json.loads(path.read_text())
        out[name] = {"xla_flags": flags, **_k1_summary(res["rows"])}
    return out


def _k1_summary(rows: dict) -> dict:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batches", default="32,64,128,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help="timed engine steps per batch size")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode tokens per jitted call")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--hf-batches", default="32,128")
    ap.add_argument("--hf-new-tokens", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smollm2-gguf", default=None)
    ap.add_argument("--smollm2-batch", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--issue16", action="store_true",
                    help="issue 16's rows: smollm2-135m ctx 512, b32/b128 x 1 token/call, b128 x 8; burst")
    ap.add_argument("--baseline-worktree", default=None,
                    help="with --issue16: jtrail checkout to compare against")
    ap.add_argument("--burst-budget", type=int, default=8192, help="prefill tokens per step in the burst")
    ap.add_argument("--baseline-label", default=None,
                    help="with --baseline-worktree: what DIR holds, recorded (e.g. the commit f6c35c1)")
    ap.add_argument("--command-buffers", default="off,all",
                    help="with --issue16: XLA command-buffer settings to measure besides the default "
                         f"({','.join(COMMAND_BUFFERS)}), each in a subprocess; 'none' skips them")
    ap.add_argument("--rows-only", default=None, choices=("k1", "k8"), help=argparse.SUPPRESS)
    ap.add_argument("--async-compare", action="store_true",
                    help="synchronous vs async scheduling (EngineConfig.async_scheduling) on the same "
                         "workloads: the issue-16 decode rows and a mixed serving workload "
                         "(default shape smollm2-135m, ctx 512; writes results/engine_async.json)")
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",")]
    args.hf_batches = [int(x) for x in args.hf_batches.split(",")]
    if args.hf_peer_only:
        print(json.dumps(hf_peer(args.shape, args.hf_batches, args.ctx, args.hf_new_tokens)))
        return
    if args.async_compare:
        args.no_hf = True
        if "--shape" not in sys.argv:
            args.shape = "smollm2-135m"
        if "--ctx" not in sys.argv:
            args.ctx = 512
        if "--out" not in sys.argv:
            args.out = str(RESULTS.with_name("engine_async.json"))
    if args.issue16:
        args.shape, args.no_hf = "smollm2-135m", True
        if "--ctx" not in sys.argv:
            args.ctx = 512
    if args.smoke:
        args.shape, args.batches, args.ctx, args.steps, args.decode_steps = "tiny", [2, 4], 48, 3, 2
        args.page_size, args.no_hf, args.hf_batches = 8, True, []
    before = run_baseline(args) if args.issue16 and args.baseline_worktree else None
    cmdbuf = run_command_buffer_variants(args) if args.issue16 and args.command_buffers != "none" else None

    hf = None if args.no_hf else run_hf_subprocess(args)  # before JAX claims the GPU
    # b256 x 1k KV (~38 GB) + 16 GB weights: let JAX's pool take most of the 80 GB
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax
    import jax.numpy as jnp
    from jtrail.models.config import NAMED_CONFIGS
    from jtrail.models.loader import random_model

    cfg = NAMED_CONFIGS[args.shape]
    t0 = time.perf_counter()
    model = random_model(cfg, jnp.bfloat16)
    jax.block_until_ready(nnx_state(model))
    init_s = time.perf_counter() - t0
    bw = copy_bandwidth(jax, jnp, (1 << 20) if args.smoke else (1 << 30))
    if args.async_compare:
        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
                  "jax": jax.__version__,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "git_commit": git_commit(), "shape": args.shape, "ctx": args.ctx, "dtype": "bfloat16",
                  "smoke": args.smoke, **run_async_compare(args, model, cfg, bw)}
        text = json.dumps(result, indent=2)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "engine_async.json").write_text(text)
        return
    if args.issue16:
        import jtrail

        after = run_issue16(args, model, cfg, bw)
        if cmdbuf is not None:
            cmdbuf["default"] = {"xla_flags": os.environ.get("XLA_FLAGS", ""), **_k1_summary(after["rows"])}
        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
                  "jax": jax.__version__,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "git_commit": git_commit(),
                  "jtrail_from": str(Path(jtrail.__file__).resolve().parent.parent),
                  "shape": args.shape, "dtype": "bfloat16", "smoke": args.smoke,
                  "tokens_per_seq_timed": None if args.smoke else TOKENS_PER_SEQ,
                  "copy_bandwidth_GBps": bw / 1e9, "baseline_worktree": args.baseline_worktree,
                  "baseline_label": args.baseline_label,
                  "rows": after["rows"], "prefill_burst": after["prefill_burst"],
                  "roofline": after["roofline"],
                  "before": before, "command_buffers": cmdbuf,
                  "bars": issue16_bars(after, before) if after["roofline"] is not None else None}
        text = json.dumps(result, indent=2)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "engine_issue16.json").write_text(text)
        print(json.dumps(result["bars"]))
        return
    rows = []
    for b in args.batches:
        rows.append(bench_decode(model, cfg, b, args, bw))
        print(json.dumps(rows[-1]), flush=True)
    by_b = {r["batch"]: r for r in rows}
    ref_b = 128 if 128 in by_b else args.batches[-1]
    bars = {"roofline_fraction_b128": by_b[ref_b]["roofline_fraction"],
            "host_gap_fraction": max(r["host_gap_fraction"] for r in rows),
            "speedup_vs_transformers_b128": None}
    if hf and "error" not in hf and str(ref_b) in hf:
        peer = hf[str(ref_b)]["decode_tokens_per_s"]
        bars["speedup_vs_transformers_b128"] = by_b[ref_b]["tokens_per_s"] / peer
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "shape": args.shape, "dtype": "bfloat16", "smoke": args.smoke,
        "copy_bandwidth_GBps": bw / 1e9, "weight_init_s": init_s,
        "decode_measurement": "KV pages allocated for ctx tokens and lengths set directly (no prefill); "
                              "bars' host gap is the max over batch sizes",
        "table": rows, "transformers": hf,
        "smollm2": bench_smollm2(args.smollm2_gguf, args) if args.smollm2_gguf else None,
        "bars": bars,
    }
    text = json.dumps(result, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "engine.json").write_text(text)
    print(json.dumps(bars))


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


if __name__ == "__main__":
    main()
