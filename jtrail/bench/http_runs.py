"""The runs of `benchmarks/http_bench.py`: warm-up, the profiling run that fixes the trace, and one trace
through each door (gRPC, HTTP, the outside tool) in alternating order, repeated."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jtrail.bench.guidellm import run_guidellm
from jtrail.bench.http_driver import drive_http
from jtrail.bench.loadgen import Workload, arrival_times, drive_grpc
from jtrail.bench.metrics import burst_capacity, summarize
from jtrail.bench.processes import drain
from jtrail.bench.repeats import mean_repeats
from jtrail.bench.server_side import server_means, server_totals


def warm_up(a: Any, grpc_addr: str, base: str, model: str, pool: list) -> None:
    """Every pool prompt once through gRPC (compiles the prefill buckets), a few through HTTP."""
    n = len(pool)
    drive_grpc(grpc_addr, Workload(pool, np.zeros(n), np.full(n, 2), forced=True,
                                   request_ids=[f"warm{i}" for i in range(n)]), timeout_s=a.run_timeout)
    drive_http(base, model, Workload(pool[:8], np.zeros(min(8, n)), np.full(min(8, n), 2)),
               timeout_s=a.run_timeout, client=a.http_client, chunk_usage=a.decode_steps > 1)
    drain([grpc_addr], 60.0)


def profile_trace(a: Any, grpc_addr: str, pool: list, log: Callable[[str], None]) -> tuple[Workload, float]:
    """Natural-EOS profile of every pool prompt sent at t=0: each prompt's forced length and the capacity;
    returns the seeded Poisson trace at --load x capacity (every policy and door runs it) and the capacity."""
    n = len(pool)
    prof = Workload(pool, np.zeros(n), np.full(n, a.max_output), forced=False,
                    request_ids=[f"prof{i}" for i in range(n)])
    res = drive_grpc(grpc_addr, prof, timeout_s=a.run_timeout)
    ok, capacity = burst_capacity(res, a.slots)
    prompts = [p for p, good in zip(pool, ok, strict=True) if good]
    lengths = np.minimum(res.output_tokens[ok], a.max_output).astype(np.int64)
    if not prompts or not capacity > 0:
        raise RuntimeError("the profiling run completed no request")
    rate = a.load * capacity
    pick = np.random.default_rng(a.seed + 1).integers(0, len(prompts), a.requests)
    wl = Workload([prompts[i] for i in pick], arrival_times(a.requests, rate, a.seed), lengths[pick],
                  forced=True, request_ids=[f"r{i}" for i in range(a.requests)])
    log(f"profiled {len(prompts)} prompts, mean output {lengths.mean():.1f}; capacity "
        f"{capacity:.2f} req/s; trace {a.requests} requests at {rate:.2f} req/s")
    drain([grpc_addr], 60.0)
    return wl, capacity


def run_doors(a: Any, policy: str, first: int, wl: Workload, addrs: tuple[str, str], model: str,
              work_dir: Any, errors: list[str], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The trace through each door --repeats times (order alternates with `first`), the server drained
    before each run; mean row per door. A failed outside-tool run is logged in `errors` and left out.
    Each row also holds the server's own means over the run (`server_side`) and, for the in-process
    drivers, the share of a core this process used (`driver_cpu_share`: near 1, the driver is the limit)."""
    grpc_addr, http_addr = addrs
    base = f"http://{http_addr}/v1"
    doors = ["grpc", "http"] + (["outside"] if a.outside != "none" else [])
    runs: dict[str, list[dict[str, Any]]] = {d: [] for d in doors}
    for rep in range(a.repeats):
        for door in doors if (rep + first) % 2 == 0 else doors[::-1]:
            drain([grpc_addr], 120.0)
            before, cpu0, t0 = server_totals(http_addr), time.process_time(), time.perf_counter()
            trace = Workload(wl.prompts, wl.arrival, wl.output_len, forced=True,
                             request_ids=[f"{door}{rep}_{i}" for i in range(len(wl))])
            if door == "grpc":
                row = summarize(drive_grpc(grpc_addr, trace, timeout_s=a.run_timeout))
            elif door == "http":
                row = summarize(drive_http(base, model, trace, timeout_s=a.run_timeout, log=log,
                                           client=a.http_client, chunk_usage=a.decode_steps > 1))
            else:
                try:
                    row = run_guidellm(a, http_addr, model, trace, work_dir, f"{policy}_{rep}", log)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    # keep the gRPC / HTTP figures of the run: the outside door is left out
                    errors.append(f"{policy} repeat {rep + 1}: {str(e)[-1500:]}")
                    log(f"{policy:6s} {door:8s} [{rep + 1}/{a.repeats}] FAILED (run goes on): "
                        f"{str(e)[-300:]}")
                    continue
            if door != "outside":  # guidellm runs in its own processes
                row["driver_cpu_share"] = (time.process_time() - cpu0) / (time.perf_counter() - t0)
            drain([grpc_addr], 120.0)  # every request of the run observed by the server
            row.update(server_means(before, server_totals(http_addr)))
            runs[door].append(row)
            log(f"{policy:6s} {door:8s} [{rep + 1}/{a.repeats}] done {row['completed']}/{row['requests']}: "
                f"mean E2E {row['mean_e2e']:.3f} s (server {row['server_mean_e2e']:.3f}), mean TTFT "
                f"{row['mean_ttft']:.3f} s (server {row['server_mean_ttft']:.3f})")
    return {d: mean_repeats(rows) for d, rows in runs.items() if rows}


def print_table(table: dict[str, dict[str, dict[str, Any]]]) -> None:
    print("\n| policy | door | done | mean E2E | p50 E2E | p99 E2E | mean TTFT | p99 TTFT | server E2E | "
          "server TPOT ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for policy, t in table.items():
        for door, r in t.items():
            srv_e2e, srv_tpot = (r.get(f"server_mean_{k}", float("nan")) for k in ("e2e", "tpot"))
            print(f"| {policy} | {door} | {r['completed']}/{r['requests']} | {r['mean_e2e']:.3f} | "
                  f"{r['p50_e2e']:.3f} | {r['p99_e2e']:.3f} | {r['mean_ttft']:.3f} | {r['p99_ttft']:.3f} | "
                  f"{srv_e2e:.3f} | {1e3 * srv_tpot:.2f} |")
