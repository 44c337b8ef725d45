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

from jtrail.bench.loadgen import Workload, arrival_times, drive_grpc
from jtrail.bench.metrics import summarize_completed
from jtrail.bench.processes import (
    Proc,
    device_name,
    drain,
    finished_counts,
    start_replica,
    start_router,
    wait_serving,
)
from jtrail.bench.prompt_pools import load_pool, load_replay_pool, sharegpt_lengths
from jtrail.bench.routing_report import carry_over, mean_rows, ratio_table, real_bars
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
    p.add_argument("--aging", type=float, default=0.0, help="trail/gittins aging (as `jtrail serve`)")
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
                   help="wall budget of the whole run: the trace is sized to fit")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds for a replica to come up")
    p.add_argument("--run-timeout", type=float, default=150.0, help="most seconds of one policy run")
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
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
    reps: list[Proc] = []
    router: Proc | None = None
    try:
        # Replicas load in parallel (each process prints its address once bound).
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(a.replicas) as ex:
            futs = [ex.submit(start_replica, i, a, log_dir) for i in range(a.replicas)]
            errors = []
            for f in futs:
                try:
                    reps.append(f.result())
                except Exception as e:  # noqa: BLE001 - stop the others, then report
                    errors.append(e)
            if errors:
                raise errors[0]
        targets = [r.target for r in reps]
        wait_serving(targets, a.start_timeout)
        log(f"replicas SERVING at {targets}")

        router = start_router("least-requests", targets, a, log_dir)
        n_pool = len(pool)
        warm = Workload(pool, np.zeros(n_pool), np.full(n_pool, 2), forced=True,
                        request_ids=[f"warm{i}" for i in range(n_pool)])
        drive_grpc(router.target, warm, timeout_s=a.run_timeout)
        log("warm-up done (every prompt prefilled once)")
        drain(targets, 60.0)
        if answers is not None:  # replay: every pool request with its recorded answer, all at t=0
            prof = Workload(pool, np.zeros(n_pool), np.zeros(n_pool), max_tokens=a.max_output,
                            answers=answers, request_ids=[f"prof{i}" for i in range(n_pool)])
        else:
            prof = Workload(pool, np.zeros(n_pool), np.full(n_pool, a.max_output), forced=False,
                            request_ids=[f"prof{i}" for i in range(n_pool)])
        res = drive_grpc(router.target, prof, timeout_s=a.run_timeout)
        ok = res.completed & (res.output_tokens > 0)
        fin = np.sort(res.finish[ok])
        k = len(fin) - a.slots * a.replicas  # exclude the tail where batches are no longer full ...
        if k < len(fin) // 2:  # ... unless that leaves too little (a pool not much larger than the slots)
            k = len(fin)
        capacity = float(k / fin[k - 1]) if len(fin) else float("nan")
        prompts = [p for p, good in zip(pool, ok, strict=True) if good]
        kept = [ans for ans, good in zip(answers, ok, strict=True) if good] if answers is not None else None
        lengths = np.minimum(res.output_tokens[ok], a.max_output).astype(np.int64)
        router.stop()
        router = None
        if not len(prompts) or not np.isfinite(capacity) or capacity <= 0:
            raise RuntimeError("the profiling run completed no request")
        log(f"profiled {len(prompts)} prompts: mean output {lengths.mean():.1f} tokens; capacity "
            f"{capacity:.2f} req/s through the router")
        drain(targets, 60.0)

        if a.lengths == "sharegpt" and not a.natural_eos:
            # capacity scales with 1 / mean output length (a decode step's cost barely depends on it);
            # the trace takes the first n of these draws
            drawn = sharegpt_lengths(max(4096, a.requests), a.max_output, a.seed + 2)
            capacity *= float(lengths.mean()) / float(drawn.mean())
            lengths = drawn
        # Size the trace so every policy fits in what is left of the deadline.
        rate = a.load * capacity
        left = a.deadline_s - (time.perf_counter() - T0) - 15.0
        per_policy = min(left / (len(routers) * a.repeats), a.run_timeout)
        tail = float(np.max(lengths)) / max(capacity / a.replicas / a.slots * float(lengths.mean()), 1e-9)
        # time to finish the last arrivals: one long request, and at least a fifth of the run for the queue
        # they find (a run that stops at per_policy drops what is unfinished from the means)
        tail = min(max(tail, per_policy / 5), per_policy / 2)
        n = int(min(a.requests, max(a.min_requests, (per_policy - tail) * rate)))
        rng = np.random.default_rng(a.seed + 1)
        pick = rng.integers(0, len(prompts), n)
        # Forced lengths: ignore_eos, max_tokens = the profiled length (identical work for every policy).
        # --natural-eos instead sends max_tokens = --max-output and lets the model stop (no true length in
        # max_tokens, which caps the engine's length predictions; greedy decoding repeats the profile).
        if kept is not None:
            out_len = np.array([len(kept[i]) for i in pick], np.int64)
        elif a.natural_eos:
            out_len = np.full(n, a.max_output)
        elif a.lengths == "sharegpt":
            out_len = lengths[:n]
        else:
            out_len = lengths[pick]
        expected_len = lengths[pick] if a.natural_eos else out_len  # what the requests generate
        if kept is not None:  # the nominal cap for every request: max_tokens leaks no length
            wl = Workload([prompts[i] for i in pick], arrival_times(n, rate, a.seed), out_len,
                          max_tokens=a.max_output, answers=[kept[i] for i in pick],
                          request_ids=[f"r{i}" for i in range(n)])
        else:
            wl = Workload([prompts[i] for i in pick], arrival_times(n, rate, a.seed), out_len,
                          forced=not a.natural_eos, request_ids=[f"r{i}" for i in range(n)])
        log(f"trace: {n} requests at {rate:.2f} req/s ({a.load:.0%} of capacity), "
            f"{per_policy:.0f} s per policy")

        runs: dict[str, list[dict]] = {name: [] for name in routers}
        for rep in range(a.repeats):  # alternate the order: no router always runs first or last
            for name in (routers if rep % 2 == 0 else routers[::-1]):
                waited = drain(targets, 60.0)
                before = finished_counts(targets)
                router = start_router(name, targets, a, log_dir)
                out = drive_grpc(router.target, wl, timeout_s=per_policy)
                router.stop()
                router = None
                row = summarize_completed(out)
                after = finished_counts(targets)
                row["per_replica_finished"] = [x - y for x, y in zip(after, before, strict=True)]
                row["drain_s_before"] = waited
                runs[name].append(row)
                if row["completed"] < n:
                    log(f"{name} [{rep + 1}/{a.repeats}]: {n - row['completed']} of {n} requests unfinished "
                        f"after {per_policy:.0f} s: this repeat gives no ratio")
                log(f"{name:15s} [{rep + 1}/{a.repeats}] done {row['completed']}/{n}: mean E2E "
                    f"{row['mean_e2e']:.3f} s, p99 {row['p99_e2e']:.3f} s, "
                    f"mean TTFT {row['mean_ttft']:.3f} s, "
                    f"split {row['per_replica_finished']}")
        table = {name: mean_rows(rows) for name, rows in runs.items()}
    finally:
        if router is not None:
            router.stop()
        for r in reps:
            r.stop()

    ratios = ratio_table(table)
    complete = all(r["completed"] == r["requests"] for r in table.values())
    ta = table["token-aware"]
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
    print(f"\n| router ({a.replicas} x {a.policy}, {a.load:.0%} load, {n} req) | done | mean E2E | p50 E2E | "
          "p99 E2E | mean TTFT | p99 TTFT | E2E / token-aware |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['completed']}/{r['requests']} | {r['mean_e2e']:.3f} | {r['p50_e2e']:.3f} | "
              f"{r['p99_e2e']:.3f} | {r['mean_ttft']:.3f} | {r['p99_ttft']:.3f} | "
              f"{r['mean_e2e'] / ta['mean_e2e']:.3f} |")
    print(f"-> {out_path}" + ("" if complete else "  (some requests did not finish: see the table; "
                               "those repeats give no ratio and the bars are not set)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
