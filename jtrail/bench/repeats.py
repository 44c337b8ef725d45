"""Repeated runs of one comparison: the order they run in and how their figures are pooled.

Why repeats: on the H200 the policies of one serving-benchmark call decoded at speeds that followed the
order they ran in, not the policy (R2 at 00b9d6f: median full-batch decode step 3.72, 3.84, 4.04,
4.22 ms for the 1st to 4th run, same batch and KV tokens per step), and in overload a 10% slower decode
decides the comparison. Running each policy twice in mirrored order (A B C, C B A) gives every policy
the same mean position, so a drift over the call falls on all of them alike."""

from __future__ import annotations

from typing import Any

import numpy as np

from jtrail.bench.loadgen import RunResult


def mirrored_order(labels: list[str], repeats: int, reverse_first: bool = False) -> list[tuple[str, int]]:
    """(label, repeat index) in run order: the labels, then reversed, then forward again, ...
    `reverse_first` starts with the reversed order (a second regime of the same call)."""
    out = []
    for rep in range(repeats):
        forward = (rep % 2 == 0) != reverse_first
        out += [(label, rep) for label in (labels if forward else labels[::-1])]
    return out


def concat_results(results: list[RunResult]) -> RunResult:
    """One RunResult holding every repeat's requests and steps (same trace each time: per-request
    latencies pool into one sample; times stay relative to each run's own start)."""
    cat = lambda name: np.concatenate([getattr(r, name) for r in results])  # noqa: E731
    return RunResult(cat("arrival"), cat("first_token"), cat("finish"), cat("output_tokens"),
                     cat("preemptions"), cat("itl"), np.concatenate([r.steps for r in results]),
                     float(sum(r.wall_s for r in results)))


def mean_repeats(rows: list[dict[str, Any]], per_repeat: tuple[str, ...] = ("mean_e2e",)) -> dict[str, Any]:
    """One comparison arm's repeats: numeric fields averaged, counts summed, and each repeat's value of
    the `per_repeat` fields kept (`<field>_per_repeat`), so the spread shows beside the mean."""
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k, v in rows[0].items()
                           if isinstance(v, int | float) and k not in ("completed", "requests")}
    out["completed"] = int(sum(r["completed"] for r in rows))
    out["requests"] = int(sum(r["requests"] for r in rows))
    for key in per_repeat:
        out[f"{key}_per_repeat"] = [r[key] for r in rows]
    for extra in ("command", "report"):
        if extra in rows[0]:
            out[extra] = [r[extra] for r in rows]
    return out
