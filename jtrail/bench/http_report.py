"""The HTTP benchmark's tables (`benchmarks/http_bench.py`): repeats averaged per door, HTTP over gRPC
and the outside tool against loadgen per policy, and the bars (the worse policy's figure)."""

from __future__ import annotations

from typing import Any


def door_ratios(table: dict[str, dict[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ratios per policy, bars): HTTP / gRPC mean E2E and TTFT, |outside tool / loadgen over HTTP - 1|,
    fcfs / trail per door; a bar is the worst policy's ratio (farthest from 1, or the largest error)."""
    ratios: dict[str, Any] = {}
    for policy, t in table.items():
        g, h = t["grpc"], t["http"]
        ratios[f"{policy}_http_over_grpc_mean_e2e"] = h["mean_e2e"] / g["mean_e2e"]
        ratios[f"{policy}_http_over_grpc_mean_ttft"] = h["mean_ttft"] / g["mean_ttft"]
        if "outside" in t:
            o = t["outside"]
            ratios[f"{policy}_outside_vs_loadgen_mean_e2e_error"] = abs(o["mean_e2e"] / h["mean_e2e"] - 1)
            ratios[f"{policy}_outside_vs_loadgen_mean_ttft_error"] = abs(o["mean_ttft"] / h["mean_ttft"] - 1)
    if "fcfs" in table and "trail" in table:
        for door in [d for d in table["fcfs"] if d in table["trail"]]:
            ratios[f"fcfs_over_trail_mean_e2e_{door}"] = (table["fcfs"][door]["mean_e2e"]
                                                          / table["trail"][door]["mean_e2e"])
    worst = lambda key: max((v for k, v in ratios.items() if k.endswith(key)), default=None,  # noqa: E731
                            key=lambda v: abs(v - 1) if "over" in key else v)
    bars = {"http_over_grpc_mean_e2e": worst("_http_over_grpc_mean_e2e"),
            "outside_vs_loadgen_mean_e2e_error": worst("_outside_vs_loadgen_mean_e2e_error")}
    return ratios, bars
