"""Serving benchmark: every scheduling policy on the same trace, real engine, real prompts.

    python benchmarks/serving.py --workload replay --replay REPLAY.npz --split bench --probe replay
    python benchmarks/serving.py [--model GGUF] [--probe DIR] [--prompts sharegpt|mtbench|FILE.jsonl]

Replay (the headline): requests from a held-out split of recorded ShareGPT conversations, each carrying
its recorded answer (the engine emits exactly it), in three regimes (R1 stable, R2 overload, R3
memory-bound; `jtrail.serving.simulation.regimes`), every policy on the same trace; see
`jtrail.bench.serving_regimes`. Natural (the older sweep, `jtrail.bench.serving_sweep`):

1. Profile: greedy natural-EOS answers (capped at --max-output) give each prompt its output length.
2. Capacity: all requests at t=0 (forced lengths, fcfs) -> max request rate with --slots / --pages.
3. Sweep: for each rate (fractions of capacity) one seeded Poisson trace; every policy runs it on a
   fresh engine (forced lengths: identical work); aging variants of `trail` at the top rate.
4. Simulator: step-time model fitted from the engine's measured steps, same trace, recorded probe
   outputs -> sim vs engine mean E2E error.
Writes benchmarks/results/serving.json (+ 2 PNGs), copies them to $OUT when set, prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from jtrail.serving.engine.config import DEFAULT_PREEMPTION_MODE, PREEMPTION_MODES

from jtrail.bench.engine_setup import load
from jtrail.bench.loadgen import load_prompt_ids
from jtrail.bench.serving_regimes import (
    REPLAY_POLICIES,
    STEP_DRIFT_LIMIT,
    merge_docs,
    run_replay_workload,
    write_doc,
)
from jtrail.bench.serving_report import analyse, write_outputs
from jtrail.bench.serving_sweep import log, measure_capacity, profile_lengths, run_sim, save_raw, sweep


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("replay", "natural"), default="natural",
                   help="replay: recorded answers (teacher-forced), regimes R1-R3; natural: profiled lengths")
    p.add_argument("--replay", default=None, help="replay set (.npz from `python -m jtrail.replay`)")
    p.add_argument("--split", default="bench", help="replay split the trace comes from (never the probe's)")
    p.add_argument("--regimes", default="R1,R2,R3")
    p.add_argument("--sim-regimes", default="R1,R2", help="regimes re-run in the simulator")
    p.add_argument("--max-answer-tokens", type=int, default=0,
                   help="cut replayed answers to this many tokens (0: as recorded; for CPU smoke runs)")
    p.add_argument("--regime-slots", type=int, default=0,
                   help="override every regime's slot count (0: as defined; for CPU smoke runs)")
    p.add_argument("--regime-requests", default="0",
                   help="requests per regime trace: N, or per regime R1=N,R3=M (0: the regime's default)")
    p.add_argument("--warm-requests", type=int, default=100, help="replay: the trace's first N requests "
                   "through a throwaway engine of each policy before its measured run (0: none)")
    p.add_argument("--alternate-order", action="store_true",
                   help="replay: run the policies in reverse order in every other regime")
    p.add_argument("--repeats", type=int, default=1, help="replay: runs of each policy, in mirrored order "
                   "(A B C C B A): averaged, each repeat's figures kept")
    p.add_argument("--capacity", default="",
                   help="per regime R2=REQ_S: reuse a capacity measured by an earlier run (default: measure)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge serving.json files of runs of different regimes into --out, and exit")
    p.add_argument("--model", default=None, help="GGUF / HF dir / named shape; default: embedded SmolLM2")
    p.add_argument("--probe", default=None, help="probe directory or shipped name (default, replay)")
    p.add_argument("--prompts", default="sharegpt", help="sharegpt, mtbench or a JSONL file")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--pages", type=int, default=384, help="KV pages (limited so memory matters)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--preemption-mode", choices=PREEMPTION_MODES, default=DEFAULT_PREEMPTION_MODE,
                   help="the engines' (and the simulator's) preemption mode: recompute, swap or keep")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="the engines' async scheduling (the engine's default: on); recorded in config")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-output", type=int, default=512, help="cap of the profiled (forced) lengths")
    p.add_argument("--pool", type=int, default=384, help="prompts profiled")
    p.add_argument("--capacity-requests", type=int, default=128)
    p.add_argument("--rates", default="0.5,0.8,0.95", help="fractions of measured capacity")
    p.add_argument("--policies", default="fcfs,trail,srpt-oracle,gittins")
    p.add_argument("--step-drift-limit", type=float, default=STEP_DRIFT_LIMIT,
                   help="replay: a regime's ratio bars are NaN when its runs' median full-batch decode "
                        "steps differ by more than this factor (the host's drift, not the policy's; 0: "
                        "no check)")
    p.add_argument("--sim-common-step", action="store_true",
                   help="replay: also simulate every policy under the capacity run's step model alone "
                        "(simulator.<regime>.drift_free: ratios without the step-time drift between runs)")
    p.add_argument("--trail-label", default="trail",
                   help="replay: the policy label whose run the bars (r*_fcfs_over_trail_*), the recorded "
                        "probe outputs and the simulator's comparison take as trail, e.g. trail-host-preempt")
    p.add_argument("--aging", default="0.03,0.1,0.3,1", help="trail aging rates, x per-request tok/s")
    p.add_argument("--deadline-s", type=float, default=420.0,
                   help="wall budget of the whole run: the sweep sizes its traces to fit")
    p.add_argument("--min-requests", type=int, default=60)
    p.add_argument("--max-requests", type=int, default=600)
    p.add_argument("--low-requests", type=int, default=0,
                   help="requests per trace below the top rate (0: sized like the top rate's)")
    p.add_argument("--run-timeout", type=float, default=120.0)
    p.add_argument("--cv", type=float, default=1.0, help="arrival-gap CV (1 = Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--raw-dir", default=str(Path.home() / ".cache" / "jtrail" / "benchmarks"),
                   help="where serving_raw.npz (per-request and per-step raw measurements, MBs) goes; "
                        "outside the source tree by default")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse(argv)
    args.command = "python benchmarks/serving.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.max_model_len = args.max_prompt_tokens + args.max_output + args.page_size
    if args.merge:
        write_doc(merge_docs([json.loads(Path(p).read_text()) for p in args.merge]), Path(args.out))
        return 0
    unknown = sorted(set(args.policies.split(",")) - set(REPLAY_POLICIES))
    if args.workload == "replay" and unknown:  # before the model loads
        raise SystemExit(f"--policies: unknown {', '.join(unknown)}; "
                         f"choose from {', '.join(REPLAY_POLICIES)}")
    if args.workload == "replay" and args.trail_label not in args.policies.split(","):
        raise SystemExit(f"--trail-label {args.trail_label!r} is not among --policies ({args.policies})")
    su = load(args)
    log(f"model loaded ({args.dtype_used}); probe {args.probe_used}")
    if args.workload == "replay":
        return run_replay_workload(su, args)
    prompts = load_prompt_ids(args.prompts, su.tokenizer, args.pool, args.max_prompt_tokens, args.seed)
    log(f"{len(prompts)} prompts loaded; profiling natural-EOS lengths")
    t = time.perf_counter()
    lengths = profile_lengths(su, prompts)
    log(f"profiled {len(prompts)} prompts in {time.perf_counter() - t:.1f}s: output mean "
        f"{lengths.mean():.0f}, p50 {np.median(lengths):.0f}, max {lengths.max()} tokens")
    su.warm_prompts = prompts[:32]
    cap = measure_capacity(su, prompts, lengths)
    log(f"capacity {cap['capacity_req_s']:.2f} req/s ({cap['tokens_per_s']:.0f} tok/s, full-batch step "
        f"{cap['full_batch_step_s'] * 1e3:.2f} ms)")
    budget = args.deadline_s - (time.perf_counter() - t_start) - 20.0  # 20 s: simulator, plots
    log(f"sweep budget {budget:.0f}s")
    sw = sweep(su, prompts, lengths, cap, max(budget, 30.0))
    save_raw(su, lengths, cap, sw)
    sim = run_sim(su, sw)
    log(f"step model {sim['step_model']}; sim errors {sim.get('errors')}")
    result = analyse(args, lengths, cap, sw, sim)
    write_outputs(args, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
