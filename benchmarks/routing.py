"""Routing on real replicas: 2 `jtrail serve` processes behind `jtrail route`, one run per routing policy.

    python benchmarks/routing.py --gpus 0,1 [--model GGUF] [--probe DIR] [--prompts sharegpt|mtbench|FILE]
    python benchmarks/routing.py --mock --requests 8      # CPU smoke test (fake tokens, no model)
    python benchmarks/routing.py --gpus 0,0 --mem-fraction 0.45 --policy trail --probe replay \
        --replay replay_all.npz --split bench                # replay: 2 replicas sharing one GPU

1. Start the replicas (replica i on GPU i with --gpus) and a router; wait until all are SERVING.
2. Warm up (every pool prompt, 2 tokens: compiles the prefill buckets), then profile: every pool prompt
   at t=0 with natural EOS (greedy, capped at --max-output) through the router. That gives each prompt
   its forced output length (ignore_eos + max_tokens = the profiled length: every policy does the same
   work, and the probe's predictions stay meaningful since the lengths are the model's own) and the
   capacity (requests/s with everything queued at t=0, excluding the tail where batches empty).
3. One seeded Poisson trace at --load x capacity (same prompts, arrivals and lengths for every policy),
   sized to fit --deadline-s; for each routing policy a fresh router process, replicas drained first
   (idle, no request left) so each policy starts from an empty system. --repeats K runs every policy K
   times on the trace, in alternating order, and averages (one run's spread is wide: see routing.json).
4. Mean / p50 / p99 E2E and TTFT per policy, ratios round-robin / token-aware and least-requests /
   token-aware. Writes benchmarks/results/routing.json (and a copy under $OUT when set).

Length modes: forced profiled lengths (default; max_tokens = the true length, and the engine caps its
length estimates at max_tokens, so estimates never exceed the truth), --natural-eos (max_tokens = the
cap for every request, the model stops itself: no length leaks to the replicas), --lengths sharegpt
(forced ShareGPT answer lengths, unrelated to what the probe sees in the prompt), --replay (the replay
set's requests: token-id prompts, each carrying its recorded answer, `forced_output_ids`, so the engine
emits exactly that answer; max_tokens = --max-output for every request, so no length leaks; the profile
run sends every pool request at t=0 for the capacity).

A run that does not finish every request within --run-timeout reports how many it finished and is not
used for a ratio: ratios come only from repeats in which both routers finished everything, and the
bars only when every repeat did.

The driver itself never imports JAX: the replicas own the accelerators.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jtrail.bench.processes import device_name, exit_on_sigterm, start_replicas, stop_procs, wait_serving
from jtrail.bench.prompt_pools import load_pool, load_replay_pool
from jtrail.bench.routing_report import carry_over, print_table, ratio_table, real_bars
from jtrail.bench.routing_runs import profile, routing_trace, run_routers
from jtrail.provenance import git_commit

OUT = Path(__file__).resolve().parent / "results" / "routing.json"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)




# --- main ------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF / HF dir / named shape; default: embedded SmolLM2")
    p.add_argument("--probe", default=None, help="probe directory (default: the shipped one); 'none': off")
    p.add_argument("--mock", action="store_true", help="mock engines (fake tokens, no model): a smoke test")
    p.add_argument("--replay", default=None, help="replay set (.npz): requests carry their recorded answers")
    p.add_argument("--split", default="bench", help="replay split (never the probe's training split)")
    p.add_argument("--max-answer-tokens", type=int, default=0,
                   help="cut replayed answers to this many tokens (0: up to --max-output; CPU smoke runs)")
    p.add_argument("--mem-fraction", type=float, default=0.0,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION of each replica (replicas sharing a GPU: --gpus 0,0)")
    p.add_argument("--mock-step-delay", type=float, default=0.005)
    p.add_argument("--gpus", default="", help="comma list: replica i runs with CUDA_VISIBLE_DEVICES=gpus[i]")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--policy", default="fcfs", help="engine policy of the replicas (fcfs, trail, ...)")
    p.add_argument("--aging", type=float, default=None,
                   help="trail/gittins aging (as `jtrail serve`; default: the policy's own)")
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--routers", default="round-robin,least-requests,token-aware",
                   help="routing policies to compare (token-aware is the reference of the ratios)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every router on the same trace, in alternating order (averaged)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--expected-tokens", type=float, default=256.0, help="`jtrail route --expected-tokens`")
    p.add_argument("--prompts", default="sharegpt", help="sharegpt, mtbench or a JSONL file of prompts")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, not chat messages")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256, help="cap of the profiled (forced) lengths")
    p.add_argument("--lengths", default="profile", choices=["profile", "sharegpt"],
                   help="forced output lengths: the model's own (profiled) or ShareGPT's answer lengths "
                        "(capped at --max-output; varied, as the simulator's routing section)")
    p.add_argument("--natural-eos", action="store_true",
                   help="policy runs stop at the model's eos (max_tokens = --max-output), not forced lengths")
    p.add_argument("--pool", type=int, default=256, help="prompts profiled (the capacity run)")
    p.add_argument("--load", type=float, default=0.9, help="fraction of the measured capacity")
    p.add_argument("--requests", type=int, default=600, help="most requests per policy run")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=360.0,
                   help="wall budget of the whole run, counted from its start (replica startup, warm-up "
                        "and profile included): each router run gets what is left / (routers x repeats), "
                        "at most --run-timeout, and the trace is sized to fit")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds for a replica to come up")
    p.add_argument("--run-timeout", type=float, default=150.0, help="most seconds of one policy run")
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    exit_on_sigterm()
    routers = [r for r in a.routers.split(",") if r]
    if "token-aware" not in routers:
        raise SystemExit("--routers must include token-aware (the reference of the ratios)")
    if a.repeats < 1 or a.replicas < 1:
        raise SystemExit(f"--repeats and --replicas must be >= 1, got {a.repeats} and {a.replicas}")
    if a.gpus and len(a.gpus.split(",")) < a.replicas:
        raise SystemExit(f"--gpus names {len(a.gpus.split(','))} devices for {a.replicas} replicas")
    command = "python benchmarks/routing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log_dir = Path(tempfile.mkdtemp(prefix="jtrail_routing_"))  # process logs (their tails show on failure)
    answers: list[np.ndarray] | None = None
    if a.replay:
        pool, answers = load_replay_pool(a)  # type: ignore[assignment]
    else:
        pool = load_pool(a)
    if not pool:
        raise SystemExit(f"no prompt of at most {a.max_prompt_tokens} tokens in {a.replay or a.prompts}")
    log(f"{len(pool)} prompts; starting {a.replicas} replicas")
    reps = []
    try:
        reps = start_replicas(a, log_dir)
        targets = [r.target for r in reps]
        wait_serving(targets, a.start_timeout)
        log(f"replicas SERVING at {targets}")
        prompts, kept, lengths, capacity = profile(pool, answers, targets, a, log_dir, log)
        wl, expected_len, rate, per_policy, capacity = routing_trace(prompts, kept, lengths, capacity, a,
                                                                     routers, T0, log)
        n = len(wl)
        table = run_routers(routers, targets, wl, a, log_dir, per_policy, log)
    finally:
        stop_procs(reps)

    ratios = ratio_table(table)
    complete = all(r["completed"] == r["requests"] for r in table.values())
    doc = {
        "command": command, "device": device_name(a),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "workload": {"prompts": f"replay {a.replay} split {a.split}" if a.replay else a.prompts,
                     "pool_profiled": len(pool), "usable": len(prompts),
                     "mode": "replay (recorded answers, forced_output_ids; max_tokens = max_output)"
                     if a.replay else "natural EOS (greedy, max_tokens = max_output)" if a.natural_eos
                     else "forced lengths (ShareGPT answer lengths, capped)" if a.lengths == "sharegpt"
                     else "forced lengths (natural-EOS greedy profile, capped)",
                     "output_len_mean": float(expected_len.mean()),
                     "output_len_p50": float(np.median(expected_len)),
                     "requests": n, "rate_req_s": rate},
        "capacity_req_s": capacity, "table": table, "ratios": ratios, "all_completed": complete,
        "bars": real_bars(table, ratios, complete),
    }
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():  # keep what the file holds besides this run: earlier runs, the simulator's bars
        doc = carry_over(json.loads(out_path.read_text()), doc)
    out_path.write_text(json.dumps(doc, indent=2))
    if os.environ.get("OUT"):
        copy = Path(os.environ["OUT"]) / out_path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if copy.resolve() != out_path.resolve():
            shutil.copy(out_path, copy)
    print_table(table, a, n)
    print(f"-> {out_path}" + ("" if complete else "  (some requests did not finish: see the table; "
                               "those repeats give no ratio and the bars are not set)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
