"""Synchronous vs async scheduling (`EngineConfig.async_scheduling`) in one process, for
`benchmarks/engine.py --async-compare`: issue 16's decode rows (steps/s, tokens/s, host gap) and a
mixed serving workload with and without the trail probe, with a count of requests whose greedy tokens
match (bf16 on a GPU: a different batch composition may flip a near-tie, so a mismatch is counted,
not fatal). Results go to `results/engine_async.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

from jtrail.bench.engine_decode import ISSUE16_ROWS, SMOKE_ROWS, TOKENS_PER_SEQ, bench_decode
from jtrail.provenance import git_commit


def bench_mixed(model, args, async_on: bool, n: int, slots: int, probe=None) -> dict:
    """n requests at once, prompts of 16..plen_max tokens and 8..gen_max output tokens (greedy, fixed
    lengths), `slots` batch slots, one token per call; fcfs, or trail with `probe` (random weights: it
    ranks arbitrarily, but its probe-only prefills and refinements run). Timed after a warm-up pass
    over the same shapes."""
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
    pred = TrailPredictor(np.linspace(0, gen_max, probe.cfg.num_bins + 1)) if probe is not None else None
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


def async_compare_result(args, model, cfg, bw: float, command: str) -> dict:
    """The JSON of `--async-compare` (written by the script)."""
    import jax

    return {"command": command, "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
            "jax": jax.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "shape": args.shape, "ctx": args.ctx, "dtype": "bfloat16",
            "smoke": args.smoke, **run_async_compare(args, model, cfg, bw)}
