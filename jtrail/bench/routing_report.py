"""The routing benchmark's tables and bars (`benchmarks/routing.py`): repeats averaged per router,
ratios to token-aware from the repeats where both finished every request, and the results file that
keeps the simulator's bars and earlier real-replica runs (`carry_over`)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def mean_rows(rows: list[dict]) -> dict:
    """One router's repeats: numeric fields averaged, with each repeat's mean E2E / TTFT kept."""
    out: dict = {k: float(np.mean([r[k] for r in rows])) for k, v in rows[0].items()
                 if isinstance(v, int | float) and k not in ("completed", "requests")}
    out["completed"] = int(sum(r["completed"] for r in rows))
    out["requests"] = int(sum(r["requests"] for r in rows))
    out["mean_e2e_per_repeat"] = [r["mean_e2e"] for r in rows]
    out["mean_ttft_per_repeat"] = [r["mean_ttft"] for r in rows]
    out["p99_e2e_per_repeat"] = [r["p99_e2e"] for r in rows]
    out["completed_per_repeat"] = [r["completed"] for r in rows]
    out["all_completed_per_repeat"] = [r["completed"] == r["requests"] for r in rows]
    out["per_replica_finished"] = [r["per_replica_finished"] for r in rows]
    return out


def ratio_table(table: dict[str, dict]) -> dict[str, Any]:
    """X / token-aware mean E2E, TTFT and p99 E2E, from the repeats in which both X and token-aware
    finished every request (None when there is none: an unfinished run says nothing about its mean);
    per-repeat ratios beside them (None for an incomplete repeat)."""
    ta = table["token-aware"]
    out: dict[str, Any] = {}
    for name, key in (("round-robin", "rr"), ("least-requests", "least_requests"),
                      ("power-of-two", "power_of_two")):
        if name not in table:
            continue
        x = table[name]
        ok = [a and b for a, b in zip(x["all_completed_per_repeat"], ta["all_completed_per_repeat"],
                                      strict=True)]
        used = [i for i, good in enumerate(ok) if good]
        out[f"{key}_repeats_used"] = len(used)
        for field, per in (("mean_e2e", "mean_e2e_per_repeat"), ("mean_ttft", "mean_ttft_per_repeat"),
                           ("p99_e2e", "p99_e2e_per_repeat")):
            out[f"{key}_over_token_aware_{field}"] = (
                float(np.mean([x[per][i] for i in used]) / np.mean([ta[per][i] for i in used]))
                if used else None)
        out[f"{key}_over_token_aware_mean_e2e_per_repeat"] = [
            x["mean_e2e_per_repeat"][i] / ta["mean_e2e_per_repeat"][i] if good else None
            for i, good in enumerate(ok)]
    return out


def real_bars(table: dict[str, dict], ratios: dict[str, Any], complete: bool) -> dict[str, Any]:
    """The issue's real-replica bars: only from runs in which every request of every repeat finished."""
    get = (lambda k: ratios.get(k)) if complete else (lambda k: None)
    bars = {"rr_over_token_aware_mean_e2e_real": get("rr_over_token_aware_mean_e2e"),
            "least_requests_over_token_aware_mean_e2e_real": get("least_requests_over_token_aware_mean_e2e"),
            "least_requests_over_token_aware_p99_e2e_real": get("least_requests_over_token_aware_p99_e2e"),
            "every_request_finished": complete}
    if complete:
        ta = table["token-aware"]["mean_e2e"]
        bars["token_aware_best"] = all(r["mean_e2e"] >= ta for r in table.values())
    return bars


def carry_over(earlier: dict, doc: dict) -> dict:
    """This run's document, with the earlier file's `history` (and its real-replica run, if it was one,
    appended to it), its simulator section and its simulator bars (keys naming sim) kept."""
    history = list(earlier.get("history", []))
    if "table" in earlier:  # the earlier top level was a real-replica run
        history.append({k: v for k, v in earlier.items() if k not in ("history", "sim8_replay")})
    bars = {k: v for k, v in earlier.get("bars", {}).items() if "sim" in k}
    out = {**doc, "bars": {**bars, **doc["bars"]}, "history": history}
    if "sim8_replay" in earlier:
        out["sim8_replay"] = earlier["sim8_replay"]
    return out


def print_table(table: dict[str, dict], a: argparse.Namespace, n: int) -> None:
    """The routers' table in Markdown (ratios to token-aware's mean E2E)."""
    ta = table["token-aware"]
    print(f"\n| router ({a.replicas} x {a.policy}, {a.load:.0%} load, {n} req) | done | mean E2E | p50 E2E | "
          "p99 E2E | mean TTFT | p99 TTFT | E2E / token-aware |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['completed']}/{r['requests']} | {r['mean_e2e']:.3f} | {r['p50_e2e']:.3f} | "
              f"{r['p99_e2e']:.3f} | {r['mean_ttft']:.3f} | {r['p99_ttft']:.3f} | "
              f"{r['mean_e2e'] / ta['mean_e2e']:.3f} |")
