"""The one latency summary of a run: per-request times in, one dict of vLLM's metrics out.

The engine benchmarks (`jtrail.bench.metrics.summarize`, in-process and front-door runs alike) and the
simulator (`SimResult.summary`) both call `summarize_requests`, so a simulated row and a measured row
carry the same keys computed the same way. Definitions (vLLM's `benchmark_serving`):

- E2E = finish - arrival; TTFT = first token - arrival;
- TPOT = (E2E - TTFT) / (output tokens - 1), over requests with more than one output token;
- ITL = the gaps between streamed tokens (samples the caller collected; keys only when given);
- throughput = output tokens (and requests) of the finished requests per second of makespan, the
  time from the first arrival to the last finish.

Choices where the three summaries this replaces disagreed:
- Latencies (E2E, TTFT, TPOT) are over the finished requests only, as vLLM counts successful requests
  only: a run cut off by its time limit says how many finished (`completed`) and its means say nothing
  about the rest. (The in-process summary used to count the TTFT of a request that started but did
  not finish; the front-door row and the simulator did not.)
- `preemptions_per_request` is over every request sent: a preemption is work the engine did whether or
  not the request then finished (the in-process summary and the simulator counted it so).
- Percentiles are numpy's default (linear interpolation between order statistics), as vLLM's.
- Throughput with no finished request or a zero makespan is NaN (the simulator said 0.0), so a
  missing figure never reads as a measured one.
- Throughput is `throughput_tok_s` (the simulator said `throughput_tokens_per_s`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .sequence import InvalidRequestError

PERCENTILES = (50, 90, 99)


def _stats(name: str, x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    out = {f"mean_{name}": float(np.mean(x)) if len(x) else float("nan")}
    for q in PERCENTILES:
        out[f"p{q}_{name}"] = float(np.percentile(x, q)) if len(x) else float("nan")
    return out


def summarize_requests(arrival: ArrayLike, first_token: ArrayLike, finish: ArrayLike,
                       output_tokens: ArrayLike, preemptions: ArrayLike, completed: ArrayLike | None = None,
                       itl: ArrayLike | None = None) -> dict[str, float]:
    """Summary of one run from per-request arrays (seconds on one clock, tokens, counts).

    `completed`: which requests finished (default: those with a finite finish time). `itl`: all
    inter-token gaps of the run (seconds), if the driver saw the stream; None leaves the ITL keys out.
    Keys: `requests`, `completed` (counts), mean/p50/p90/p99 of `e2e`, `ttft`, `tpot` (and `itl`),
    `makespan_s`, `throughput_tok_s`, `throughput_req_s`, `preemptions_per_request`, `output_tokens`
    (all requests' tokens: the same work under every policy in a forced-length run)."""
    arr = np.asarray(arrival, float)
    first, fin = np.asarray(first_token, float), np.asarray(finish, float)
    n_out, npre = np.asarray(output_tokens, float), np.asarray(preemptions, float)
    n = len(arr)
    for name, x in (("first_token", first), ("finish", fin), ("output_tokens", n_out), ("preemptions", npre)):
        if x.shape != (n,):
            raise InvalidRequestError(name, f"needs one value per request ({n}), got shape {x.shape}")
    ok = np.isfinite(fin) if completed is None else np.asarray(completed, bool)
    if ok.shape != (n,):
        raise InvalidRequestError("completed", f"needs one value per request ({n}), got shape {ok.shape}")
    e2e, ttft = (fin - arr)[ok], (first - arr)[ok]
    out: dict[str, float] = {"requests": n, "completed": int(ok.sum())}
    out.update(_stats("e2e", e2e))
    out.update(_stats("ttft", ttft))
    multi = n_out[ok] > 1
    out.update(_stats("tpot", (e2e[multi] - ttft[multi]) / (n_out[ok][multi] - 1)))
    if itl is not None:
        out.update(_stats("itl", np.asarray(itl, float)))
    span = float(np.max(fin[ok]) - np.min(arr)) if ok.any() else float("nan")
    out["makespan_s"] = span
    good = ok.any() and span > 0
    out["throughput_tok_s"] = float(n_out[ok].sum() / span) if good else float("nan")
    out["throughput_req_s"] = float(ok.sum() / span) if good else float("nan")
    out["preemptions_per_request"] = float(np.mean(npre)) if n else 0.0
    out["output_tokens"] = float(n_out.sum())
    return out
