"""http_bench's ratios and bars when the outside tool ran for only one policy (it failed for the other:
the run keeps its gRPC and HTTP figures)."""

from __future__ import annotations

import pytest

from jtrail.bench.http_report import door_ratios


def row(e2e: float, ttft: float) -> dict[str, float]:
    return {"mean_e2e": e2e, "mean_ttft": ttft}


def test_ratios_skip_a_door_missing_for_one_policy() -> None:
    table = {"fcfs": {"grpc": row(2.0, 0.1), "http": row(2.2, 0.2), "outside": row(2.42, 0.2)},
             "trail": {"grpc": row(1.0, 0.1), "http": row(1.03, 0.1)}}
    ratios, bars = door_ratios(table)
    assert ratios["fcfs_http_over_grpc_mean_e2e"] == pytest.approx(1.1)
    assert ratios["trail_http_over_grpc_mean_e2e"] == pytest.approx(1.03)
    assert ratios["fcfs_outside_vs_loadgen_mean_e2e_error"] == pytest.approx(0.1)
    assert "trail_outside_vs_loadgen_mean_e2e_error" not in ratios
    assert "fcfs_over_trail_mean_e2e_outside" not in ratios
    assert ratios["fcfs_over_trail_mean_e2e_http"] == pytest.approx(2.2 / 1.03)
    assert bars["http_over_grpc_mean_e2e"] == pytest.approx(1.1)  # the worse policy
    assert bars["outside_vs_loadgen_mean_e2e_error"] == pytest.approx(0.1)
