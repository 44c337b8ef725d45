"""Latency metrics of one run, with vLLM's definitions.

E2E = finish - arrival; TTFT = first token - arrival; TPOT = (E2E - TTFT) / (output_tokens - 1) over
requests with more than one output token; ITL = gaps between streamed tokens; throughput = output
tokens (and requests) per second over the run's makespan (first arrival to last finish).
`summarize` is the in-process benchmarks' full summary; `summarize_completed` the front-door
benchmarks' shorter row over finished requests only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PCTS = (50, 90, 99)


def _stats(name: str, x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    out = {f"mean_{name}": float(np.mean(x)) if len(x) else float("nan")}
    for q in PCTS:
        out[f"p{q}_{name}"] = float(np.percentile(x, q)) if len(x) else float("nan")
    return out


def summarize(res: Any) -> dict[str, float]:
    """Metrics of a `jtrail.bench.loadgen.RunResult` (seconds, tokens/s)."""
    ok = res.completed
    e2e = res.finish - res.arrival
    ttft = res.first_token - res.arrival
    out: dict[str, float] = {"requests": float(len(e2e)), "completed": float(ok.sum())}
    out.update(_stats("e2e", e2e[ok]))
    out.update(_stats("ttft", ttft[np.isfinite(ttft)]))
    n = res.output_tokens
    multi = ok & (n > 1)
    out.update(_stats("tpot", (e2e[multi] - ttft[multi]) / (n[multi] - 1)))
    out.update(_stats("itl", res.itl))
    span = float(np.nanmax(res.finish) - np.min(res.arrival)) if ok.any() else float("nan")
    out["makespan_s"] = span
    out["throughput_tok_s"] = float(n[ok].sum() / span) if ok.any() and span > 0 else float("nan")
    out["throughput_req_s"] = float(ok.sum() / span) if ok.any() and span > 0 else float("nan")
    out["preemptions_per_request"] = float(np.mean(res.preemptions)) if len(res.preemptions) else 0.0
    out["output_tokens"] = float(n.sum())
    return out


def summarize_completed(res: Any) -> dict[str, float]:
    """The front-door benchmarks' row (routing, HTTP vs gRPC): mean, p50 and p99 of E2E and TTFT over
    the requests that finished only (a run cut off by its time limit reports how many finished, and its
    means say nothing about the rest), with the run's wall time."""
    ok = res.completed
    e2e = (res.finish - res.arrival)[ok]
    ttft = (res.first_token - res.arrival)[ok]
    row: dict[str, float] = {"completed": int(ok.sum()), "requests": len(ok), "wall_s": float(res.wall_s)}
    for name, x in (("e2e", e2e), ("ttft", ttft)):
        row[f"mean_{name}"] = float(x.mean()) if len(x) else float("nan")
        for q in (50, 99):
            row[f"p{q}_{name}"] = float(np.percentile(x, q)) if len(x) else float("nan")
    return row


def burst_capacity(res: Any, total_slots: int) -> tuple[np.ndarray, float]:
    """(requests that finished with output, requests/s) of a run with every request sent at t=0:
    completions per second up to the k-th, k leaving out the last `total_slots` finishes (the tail
    where batches are no longer full), unless that leaves less than half (a pool not much larger than
    the slots): then all of them."""
    ok = res.completed & (res.output_tokens > 0)
    fin = np.sort(res.finish[ok])
    k = len(fin) - total_slots
    if k < len(fin) // 2:
        k = len(fin)
    return ok, float(k / fin[k - 1]) if len(fin) else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b, NaN when undefined (so a missing number never reads as a pass)."""
    return float(a / b) if b and np.isfinite(a) and np.isfinite(b) else float("nan")


def cdf_points(x: np.ndarray, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, cumulative fraction), thinned to at most max_points for small plots/JSON."""
    x = np.sort(np.asarray(x, float)[np.isfinite(x)])
    if len(x) == 0:
        return x, x
    idx = np.unique(np.linspace(0, len(x) - 1, min(max_points, len(x))).astype(int))
    return x[idx], (idx + 1) / len(x)
