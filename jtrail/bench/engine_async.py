"""Synchronous vs async scheduling (`EngineConfig.async_scheduling`) in one process, for
`benchmarks/engine.py --async-compare`: issue 16's decode rows (steps/s, tokens/s, host gap) and a
mixed serving workload with and without the trail probe, with a count of requests whose greedy tokens
match (bf16 on a GPU: a different batch composition may flip a near-tie, so a mismatch is counted,
not fatal). Results go to `results/engine_async.json`, rewritten after every row (a run cut short
still leaves the rows it finished, with `complete: false`), with the seconds of every part.

Time (H200, 2026-12-02): the first version timed out at 150 s in the mixed part. Each mixed engine
ran the whole workload twice, an untimed pass to compile and a timed one (8 passes of 512 requests,
~1,300 steps each at 128 slots). Now each engine compiles with `engine.warmup()` (one request per
packed prefill capacity and the decode step: the shapes the workload uses; the compiles seen during
the timed pass are recorded, `compiles_in_timed`, to show it), and the workload is 256 requests
(`--mixed-requests`): same length mix, two admission waves at 128 slots, ~860 steps (the tail is set
by the longest outputs, not the count).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from collections.abc import Callable

from jtrail.bench.engine_decode import ISSUE16_ROWS, SMOKE_ROWS, TOKENS_PER_SEQ, bench_decode
from jtrail.provenance import git_commit

MIXED_REQUESTS = 256  # --mixed-requests default (GPU); --smoke runs 12
MIXED_SLOTS = 128


def _compiles() -> tuple[int, float]:
    """XLA backend compiles so far in this process (count, seconds)."""
    from jtrail.serving.engine.step_programs import BACKEND_COMPILES

    return BACKEND_COMPILES["n"], BACKEND_COMPILES["s"]


def bench_mixed(model, args, async_on: bool, n: int, slots: int, probe=None) -> dict:
    """n requests at once, prompts of 16..plen_max tokens and 8..gen_max output tokens (greedy, fixed
    lengths), `slots` batch slots, one token per call; fcfs, or trail with `probe` (random weights: it
    ranks arbitrarily, but its probe-only prefills and refinements run). Timed after the engine's
    warm-up (every packed prefill shape and the decode step compiled)."""
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

    c0, t0 = _compiles(), time.perf_counter()
    engine.warmup(report=lambda _line: None)
    warm_s, c1 = time.perf_counter() - t0, _compiles()
    seqs = [engine.add_request(f"t{i}", p, sp) for i, (p, sp) in enumerate(work)]
    t0, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    wall, c2 = time.perf_counter() - t0, _compiles()
    outs = {s.request_id: s.output_ids for s in seqs}
    toks = sum(len(v) for v in outs.values())
    result = {"async_scheduling": async_on, "requests": n, "slots": slots, "probe": probe is not None,
              "wall_s": wall, "steps": steps, "steps_per_s": steps / wall, "output_tokens_per_s": toks / wall,
              "output_tokens": toks, "preemptions": engine.num_preemptions,
              "warmup_s": warm_s, "compiles_in_warmup": c1[0] - c0[0],
              "compiles_in_timed": c2[0] - c1[0], "compile_s_in_timed": c2[1] - c1[1], "outputs": outs}
    del engine
    gc.collect()  # free this engine's KV cache before the next one is allocated
    return result


class Progress:
    """The result so far: `emit` gets it (with `complete` and the seconds of every part) after each
    row, so a run cut short still leaves a file."""

    def __init__(self, head: dict, emit: Callable[[dict], None]):
        self.result = {**head, "complete": False, "part_seconds": {}, "decode_rows": {}, "mixed": {}}
        self.emit = emit
        self.t_start = time.perf_counter()

    def part(self, name: str, seconds: float) -> None:
        self.result["part_seconds"][name] = seconds
        print(f"[async-compare] {name}: {seconds:.1f} s (total {time.perf_counter() - self.t_start:.1f} s)",
              flush=True)

    def save(self, complete: bool = False) -> None:
        self.result["complete"] = complete
        self.result["total_s"] = time.perf_counter() - self.t_start
        # a sync mixed row holds its token ids until the async row is compared with it: not saved
        mixed = {name: {k: ({f: x for f, x in v.items() if f != "outputs"} if isinstance(v, dict) else v)
                        for k, v in entry.items()} for name, entry in self.result["mixed"].items()}
        self.emit({**self.result, "mixed": mixed})


def run_async_compare(args, model, cfg, bw: float, prog: Progress) -> dict:
    from flax import nnx

    from jtrail.models.probe import ProbeConfig, ProbeHead

    rows = prog.result["decode_rows"]
    for key, (b, k) in (SMOKE_ROWS if args.smoke else ISSUE16_ROWS).items():
        steps = args.steps if args.smoke else TOKENS_PER_SEQ // k
        for mode in (False, True):
            a = argparse.Namespace(**{**vars(args), "decode_steps": k, "steps": steps,
                                      "async_scheduling": mode})
            t0 = time.perf_counter()
            r = bench_decode(model, cfg, b, a, bw)
            r["steps_per_s"] = 1e3 / r["step_wall_ms"]
            name = f"{key}_{'async' if mode else 'sync'}"
            rows[name] = r
            print(json.dumps({key: r}), flush=True)
            prog.part(f"decode {name}", time.perf_counter() - t0)
            prog.save()
        sync_tps, async_tps = rows[f"{key}_sync"]["tokens_per_s"], rows[f"{key}_async"]["tokens_per_s"]
        rows[f"{key}_async_speedup"] = async_tps / sync_tps
    n, slots = (12, 4) if args.smoke else (args.mixed_requests, MIXED_SLOTS)
    probe = ProbeHead(ProbeConfig(d_model=cfg.d_model, layer=cfg.n_layers // 2, hidden=64), rngs=nnx.Rngs(0))
    mixed = prog.result["mixed"]
    for name, pr in (("fcfs", None), ("trail_probe", probe)):
        mixed[name] = entry = {"requests": n}
        for mode in ("sync", "async"):
            t0 = time.perf_counter()
            entry[mode] = bench_mixed(model, args, mode == "async", n, slots, pr)
            prog.part(f"mixed {name} {mode} (warm-up {entry[mode]['warmup_s']:.1f} s, "
                      f"timed {entry[mode]['wall_s']:.1f} s)", time.perf_counter() - t0)
            prog.save()
        sync, asyn = entry["sync"], entry["async"]
        entry["requests_same_tokens"] = sum(sync["outputs"][r] == asyn["outputs"][r] for r in sync["outputs"])
        entry["async_speedup_wall"] = sync["wall_s"] / asyn["wall_s"]
        for r in (sync, asyn):
            r.pop("outputs")
        print(json.dumps({name: entry}), flush=True)
        prog.save()
    return prog.result


def async_compare_result(args, model, cfg, bw: float, command: str, emit: Callable[[dict], None],
                         setup_s: float | None = None) -> dict:
    """The JSON of `--async-compare`; `emit` (the script's writer) gets it after every row and at
    the end (`complete: true`). `setup_s`: the script's seconds before this (imports, weights, copy
    bandwidth), reported as the first part."""
    import jax

    head = {"command": command, "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
            "jax": jax.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "shape": args.shape, "ctx": args.ctx, "dtype": "bfloat16",
            "smoke": args.smoke}
    prog = Progress(head, emit)
    if setup_s is not None:
        prog.t_start -= setup_s  # totals count from the script's start
        prog.part("setup (imports, random weights, copy bandwidth)", setup_s)
    result = run_async_compare(args, model, cfg, bw, prog)
    prog.save(complete=True)
    return result
