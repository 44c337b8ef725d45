"""A run's latencies as the server itself measured them, beside what the client timed.

`jtrail serve` keeps cumulative histograms of every request it finishes, whichever door it came through
(`serving.frontdoor.metrics`: arrival at the door to the first / last token, no client in it). Read
before and after a run on a drained server, their difference is that run's server-side mean: a door or
a driver that the client-side figures show slower while these stay equal is slow in the client (its
timing, connections, per-chunk work), one whose server-side figures grow too made the server slower."""

from __future__ import annotations

import math
import re
import urllib.request

# jtrail's own histograms (namespace "jtrail"), by the row key they give
HISTOGRAMS = {"e2e": "jtrail_e2e_request_latency_seconds", "ttft": "jtrail_time_to_first_token_seconds",
              "tpot": "jtrail_time_per_output_token_seconds"}


def parse_totals(text: str) -> dict[str, float]:
    """Each histogram's `_sum` and `_count` from Prometheus text (nan when absent)."""
    out: dict[str, float] = {}
    for key, name in HISTOGRAMS.items():
        for part in ("sum", "count"):
            m = re.search(rf"^{name}_{part} (\S+)$", text, re.MULTILINE)
            out[f"{key}_{part}"] = float(m.group(1)) if m else math.nan
    return out


def server_totals(http_addr: str, timeout_s: float = 10.0) -> dict[str, float]:
    """The histograms' running totals from the server's GET /metrics (host:port of its HTTP door)."""
    with urllib.request.urlopen(f"http://{http_addr}/metrics", timeout=timeout_s) as r:
        return parse_totals(r.read().decode())


def server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """server_mean_e2e / _ttft / _tpot (seconds) of the requests finished between two readings."""
    out = {}
    for key in HISTOGRAMS:
        n = after[f"{key}_count"] - before[f"{key}_count"]
        out[f"server_mean_{key}"] = (after[f"{key}_sum"] - before[f"{key}_sum"]) / n if n > 0 else math.nan
    return out
