"""The routing benchmark's runs on real replicas (`benchmarks/routing.py`): warm-up and profile through
a router (each prompt's length and the capacity), the trace sized to the deadline, and every router on
it, repeated in alternating order, each through a fresh `jtrail route` process after the replicas
drained."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jtrail.bench.loadgen import Workload, arrival_times, drive_grpc
from jtrail.bench.metrics import burst_capacity, summarize
from jtrail.bench.processes import Proc, drain, finished_counts, start_router
from jtrail.bench.prompt_pools import sharegpt_lengths
from jtrail.bench.routing_report import mean_rows

Log = Callable[[str], None]


def profile(pool: list[Any], answers: list[np.ndarray] | None, targets: list[str], a: argparse.Namespace,
            log_dir: Path, log: Log) -> tuple[list[Any], list[np.ndarray] | None, np.ndarray, float]:
    """Warm-up (every pool prompt, 2 tokens), then every pool request at t=0 through a least-requests
    router: (prompts that finished, their recorded answers in replay, their lengths, capacity req/s)."""
    router = start_router("least-requests", targets, a, log_dir)
    try:
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
        ok, capacity = burst_capacity(res, a.slots * a.replicas)
        prompts = [p for p, good in zip(pool, ok, strict=True) if good]
        kept = [ans for ans, good in zip(answers, ok, strict=True) if good] if answers is not None else None
        lengths = np.minimum(res.output_tokens[ok], a.max_output).astype(np.int64)
    finally:
        router.stop()
    if not len(prompts) or not np.isfinite(capacity) or capacity <= 0:
        raise RuntimeError("the profiling run completed no request")
    log(f"profiled {len(prompts)} prompts: mean output {lengths.mean():.1f} tokens; capacity "
        f"{capacity:.2f} req/s through the router")
    drain(targets, 60.0)
    return prompts, kept, lengths, capacity


def routing_trace(prompts: list[Any], kept: list[np.ndarray] | None, lengths: np.ndarray, capacity: float,
                  a: argparse.Namespace, routers: list[str], t0: float,
                  log: Log) -> tuple[Workload, np.ndarray, float, float, float]:
    """The seeded Poisson trace at a.load x capacity, sized so every router's repeats fit in what is
    left of a.deadline_s (counted from t0): (workload, the lengths its requests generate, rate,
    seconds per router run, capacity: rescaled to ShareGPT's mean length with --lengths sharegpt)."""
    if a.lengths == "sharegpt" and not a.natural_eos:
        # capacity scales with 1 / mean output length (a decode step's cost barely depends on it);
        # the trace takes the first n of these draws
        drawn = sharegpt_lengths(max(4096, a.requests), a.max_output, a.seed + 2)
        capacity *= float(lengths.mean()) / float(drawn.mean())
        lengths = drawn
    # Size the trace so every policy fits in what is left of the deadline.
    rate = a.load * capacity
    left = a.deadline_s - (time.perf_counter() - t0) - 15.0
    per_policy = min(left / (len(routers) * a.repeats), a.run_timeout)
    if per_policy < 2.0:
        raise RuntimeError(f"--deadline-s {a.deadline_s:.0f} leaves {per_policy:.1f} s per router run after "
                           f"{time.perf_counter() - t0:.0f} s of startup, warm-up and profile: raise it "
                           "(it is the whole run's budget)")
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
    return wl, expected_len, rate, per_policy, capacity


def run_routers(routers: list[str], targets: list[str], wl: Workload, a: argparse.Namespace, log_dir: Path,
                per_policy: float, log: Log) -> dict[str, dict]:
    """Every router on the trace, a.repeats times in alternating order; the repeats averaged per router."""
    n = len(wl)
    router: Proc | None = None
    try:
        runs: dict[str, list[dict]] = {name: [] for name in routers}
        for rep in range(a.repeats):  # alternate the order: no router always runs first or last
            for name in (routers if rep % 2 == 0 else routers[::-1]):
                waited = drain(targets, 60.0)
                before = finished_counts(targets)
                router = start_router(name, targets, a, log_dir)
                out = drive_grpc(router.target, wl, timeout_s=per_policy)
                router.stop()
                router = None
                row = summarize(out)
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
    return table
