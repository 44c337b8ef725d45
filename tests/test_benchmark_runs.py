"""Every script in benchmarks/ runs end to end on CPU through its own `__main__`, with tiny sizes, and
writes only under the test's tmp dir (the child's cwd, --out / --raw-dir, $OUT and $TMPDIR all point
there; tmp_path/benchmarks/results is where the scripts that write relative to the cwd put their
JSON). Two child processes: the simulator scripts and the HTTP bench (no JAX in the child's own
work), then the scripts that run a model in-process (one JAX import for all of them).
benchmarks/routing.py: tests/test_routing_bench.py. benchmarks/kernels.py times GPU kernels (Triton
Pallas, JAX's GPU paged attention, cuDNN flash attention); its --smoke runs the same code on CPU in
Pallas interpret mode at tiny shapes (a third child)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from _bench_runner import assert_finite, load, run_scripts

# The tiny model (named shape "tiny", random weights, byte-level tokenizer) needs a probe of its width.
PROBE_PRELUDE = """
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.probe import ProbeConfig, ProbeHead
from jtrail.models.probe_io import save_probe
save_probe("probe", ProbeHead(ProbeConfig(d_model=NAMED_CONFIGS["tiny"].d_model, layer=0, hidden=16),
                              rngs=nnx.Rngs(0)))
"""


# 4 fake CPU devices for scale.py (the prelude imports JAX before it runs), and XLA's CPU backend
# without its expensive LLVM passes: compiling is most of these runs' time (measured: 35 s -> 18 s
# of capacity_check.py's), and they check the scripts, not CPU speed.
XLA_FLAGS = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")


def _inputs(tmp: Path) -> None:
    """A replay set (token ids inside the tiny model's 256-token vocabulary, all in split 'bench') and
    a prompt file."""
    from jtrail.replay import ReplaySet

    rng = np.random.default_rng(0)
    n = 48
    ReplaySet([rng.integers(3, 250, 4 + i % 9) for i in range(n)],
              [rng.integers(3, 250, 2 + (5 * i) % 13) for i in range(n)],
              [f"c{i}" for i in range(n)], ["bench"] * n).save(tmp / "replay.npz")
    lines = [json.dumps({"prompt": f"q{i} " + "why? " * (1 + i % 3)}) + "\n" for i in range(24)]
    (tmp / "prompts.jsonl").write_text("".join(lines))


def _env(tmp: Path) -> dict[str, str]:
    (tmp / "out").mkdir(exist_ok=True)
    (tmp / "tmp").mkdir(exist_ok=True)
    return {"OUT": str(tmp / "out"), "TMPDIR": str(tmp / "tmp"), "JAX_PLATFORMS": "cpu"}


def test_simulator_and_http_benchmarks_run_end_to_end(tmp_path: Path) -> None:
    _inputs(tmp_path)
    run_scripts([
        ["simulate.py", "--smoke", "--out", "simulate.json"],
        ["tune_preemption.py", "--smoke", "--out", "tune.json"],
        ["routing_sim_replay.py", "--replay", "replay.npz", "--requests", "60", "--replicas", "2",
         "--out", "routing_sim8.json"],
        ["http_bench.py", "--mock", "--prompts", "prompts.jsonl", "--pool", "8", "--requests", "8",
         "--max-output", "6", "--slots", "2", "--pages", "64", "--policies", "fcfs", "--outside", "none",
         "--out", "http/http.json"],
    ], tmp_path, _env(tmp_path))

    sim = load(tmp_path / "simulate.json")
    assert sim["missing_sections"] == []
    assert sim["bars"]["sim_seconds_1m_requests"] is None  # a smoke run has no 1M-request run
    assert_finite(sim["bars"], ["sim_vs_theory_error", "rr_over_token_aware_mean_e2e_sim8",
                                "least_requests_over_token_aware_mean_e2e_sim8"])
    assert sim["theory"]["requests"] < 1000 and sim["speed"]["requests"] < 10_000

    tune = load(tmp_path / "tune.json")
    assert tune["seeds"] == [1] and set(tune["regimes"]) == {"R1", "R2", "R3"}
    assert tune["regimes"]["R1"]["requests"] == [30]
    assert tune["chosen"]["label"] in tune["table"]["R1"]
    assert_finite(tune["bars_sim"], list(tune["bars_sim"]))
    assert len(tune["bars_sim"]) == 15  # five bars per regime

    rs = load(tmp_path / "routing_sim8.json")
    assert [r["seed"] for r in rs["runs"]] == [11]
    assert_finite(rs["runs"][0]["ratios"],
                  ["rr_over_token_aware_mean_e2e", "least_requests_over_token_aware_mean_e2e"])

    http = load(tmp_path / "http" / "http.json")
    assert (tmp_path / "out" / "http.json").exists()  # the $OUT copy
    assert_finite(http["bars"], ["http_over_grpc_mean_e2e"])
    assert http["bars"]["outside_vs_loadgen_mean_e2e_error"] is None  # --outside none
    for door in ("grpc", "http"):
        assert http["table"]["fcfs"][door]["completed"] == 8, http["table"]
        # the server's own view of the same run (jtrail.bench.server_side) and the driver's CPU share
        assert_finite(http["table"]["fcfs"][door],
                      ["server_mean_e2e", "server_mean_ttft", "driver_cpu_share"])


def test_model_benchmarks_run_end_to_end_on_cpu(tmp_path: Path) -> None:
    _inputs(tmp_path)
    tiny = ["--model", "tiny", "--probe", "probe"]
    outs = run_scripts([
        ["scale.py", "--smoke", "--batches", "4", "--steps", "2", "--calls", "1"],  # XLA_FLAGS' 4 devices
        ["engine.py", "--smoke", "--out", "engine.json"],
        ["serving.py", *tiny, "--prompts", "prompts.jsonl", "--pool", "12", "--max-prompt-tokens", "24",
         "--max-output", "6", "--slots", "2", "--pages", "64", "--capacity-requests", "6", "--rates", "0.9",
         "--policies", "fcfs,trail,srpt-oracle", "--aging", "0.1", "--deadline-s", "1", "--min-requests", "8",
         "--max-requests", "8", "--out", "serving", "--raw-dir", "raw"],
        ["serving_resim.py", "raw/serving_raw.npz", "--probe", "probe", "--slots", "2", "--pages", "64"],
        ["routing_resim.py", "raw/serving_raw.npz", "--requests", "40", "--seeds", "1", "--loads", "0.9",
         "--slots", "2", "--pages", "64", "--out", "routing_resim.json"],
        ["capacity_check.py", "--replay", "replay.npz", *tiny, "--requests", "40", "--max-tokens", "24",
         "--out", "capacity.json"],
        # replay regimes, each policy twice in mirrored order (R1 on 2 slots: the tiny pool fills them)
        ["serving.py", "--workload", "replay", "--replay", "replay.npz", *tiny, "--max-prompt-tokens", "24",
         "--max-output", "16", "--regimes", "R1", "--sim-regimes", "R1", "--regime-slots", "2",
         "--regime-requests", "R1=8", "--capacity-requests", "8", "--warm-requests", "2", "--repeats", "2",
         "--policies", "fcfs,trail-preempt", "--trail-label", "trail-preempt", "--out", "serving_replay",
         # a shared 2-core CPU's step times drift: the drift check is tested in test_serving_bars
         "--step-drift-limit", "0", "--sim-common-step"],
    ], tmp_path, {**_env(tmp_path), "XLA_FLAGS": XLA_FLAGS}, prelude=PROBE_PRELUDE)

    scale = load(tmp_path / "benchmarks" / "results" / "scale_smoke.json")
    assert (tmp_path / "out" / "scale_smoke.json").exists()
    assert_finite(scale["bars"], ["tp2_over_tp1_throughput", "replicas2_over_1_throughput"])

    eng = load(tmp_path / "engine.json")
    assert (tmp_path / "out" / "engine.json").exists() and eng["smoke"] and len(eng["table"]) == 2
    assert_finite(eng["bars"], ["roofline_fraction_b128", "host_gap_fraction"])
    assert eng["bars"]["speedup_vs_transformers_b128"] is None  # no transformers peer in a smoke run

    srv = load(tmp_path / "serving" / "serving.json")
    assert_finite(srv["bars"], ["fcfs_over_trail_mean_e2e", "fcfs_over_trail_mean_ttft",
                                "trail_over_oracle_mean_e2e", "trail_over_fcfs_p99_e2e",
                                "sim_vs_engine_mean_e2e_error"])
    assert (tmp_path / "out" / "serving_raw.npz").exists() and (tmp_path / "out" / "serving.json").exists()

    # serving_resim prints (writes no file): sim vs engine mean E2E per policy
    for policy in ("fcfs", "trail", "srpt-oracle"):
        row = re.search(rf"^\s+{re.escape(policy)} +(\S+) +(\S+) +(\S+)%", outs["serving_resim.py"], re.M)
        assert row and all(math.isfinite(float(x)) for x in row.groups()), outs["serving_resim.py"]

    rr = load(tmp_path / "routing_resim.json")
    assert_finite(rr, ["capacity_req_s"])
    assert rr["rows"] and all(math.isfinite(v) for r in rr["rows"] for v in r["mean_e2e"].values())

    cap = load(tmp_path / "capacity.json")["result"]
    assert cap["requests"] == cap["completed"] == 40
    assert_finite(cap, ["capacity_req_s", "max_step_s", "mean_answer_tokens"])
    assert cap["capacity_req_s"] > 0

    rep = load(tmp_path / "serving_replay" / "serving.json")
    assert rep["workload"]["split"] == "bench"
    assert [r["policy"] for r in rep["table"]] == ["fcfs", "trail-preempt"]
    for r in rep["table"]:  # the mean of two repeats, each kept, every request of both finished
        assert r["repeats"] == 2 and r["completed"] == r["requests"] == 16
        assert np.mean(r["mean_e2e_per_repeat"]) == pytest.approx(r["mean_e2e"])
        assert len(r["median_decode_step_ms_per_repeat"]) == 2
    order = [(x["policy"], x["repeat"]) for x in load(tmp_path / "out" / "serving_partial.json")]
    assert order == [("fcfs", 0), ("trail-preempt", 0), ("trail-preempt", 1), ("fcfs", 1)]
    # --trail-label: the bars, the recorded probe outputs and the simulator take trail-preempt as trail
    assert_finite(rep["bars"], ["r1_fcfs_over_trail_mean_e2e", "sim_vs_engine_mean_e2e_error"])
    fcfs_row, trail_row = rep["table"]
    ratio = fcfs_row["mean_e2e"] / trail_row["mean_e2e"]
    assert rep["bars"]["r1_fcfs_over_trail_mean_e2e"] == pytest.approx(ratio)
    assert rep["bars"]["r1_trail_preemptions_per_request"] == trail_row["preemptions_per_request"]
    assert math.isfinite(rep["bars"]["r1_step_time_spread"])
    # --sim-common-step: both policies simulated under the capacity run's step model alone
    free = rep["simulator"]["R1"]["drift_free"]
    assert free["fcfs"]["fcfs_over_mean_e2e"] == 1.0
    assert math.isfinite(free["trail-preempt"]["fcfs_over_mean_e2e"])
    # every run's step time against the capacity run's step model; the trace with the recorded probe
    # outputs saved for offline tuning (benchmarks/tune_recorded.py), one row per generated token
    assert all(math.isfinite(r["step_speed_vs_capacity_run"]) and r["step_speed_vs_capacity_run"] > 0
               for r in rep["table"])
    from jtrail.bench.recorded_trace import load_recorded_trace

    rt = load_recorded_trace(tmp_path / "out" / "trace_R1.npz")
    assert rt.split == "bench" and len(rt.request_ids) == 8 and rt.resources.num_slots == 2
    assert all(len(rt.records[r]) >= n for r, n in zip(rt.request_ids, rt.output_len, strict=True))


def test_kernel_benchmark_smoke_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/kernels.py --smoke: its GPU kernels, JAX's and the reference in Pallas interpret mode at
    tiny shapes; the correctness checks hold and every timed row and bar is there."""
    run_scripts([["kernels.py", "--smoke", "--out", "k/kernels.json"]], tmp_path,
                {**_env(tmp_path), "XLA_FLAGS": XLA_FLAGS})
    assert not (tmp_path / "benchmarks").exists()  # --out only: nothing where real results go
    doc = load(tmp_path / "k" / "kernels.json")
    assert doc["smoke"] and doc["shapes"]["hq"] == 8 and doc["shapes"]["hkv"] == 2
    checks = doc["checks"]
    errs = {k: v for k, v in checks.items() if not k.endswith("_exact")}
    assert sorted(errs) == [f"{kind}_float32_9_3_64" for kind in
                            ("decode", "decode_split2", "decode_split4", "prefill")], sorted(checks)
    assert all(err < 1e-5 for err in errs.values()), errs  # float32 tolerance of test_kernels.py
    assert checks["write_kv_float32_9_3_64_exact"] is True
    rows = [(r["kind"], r["batch"], r["ctx"]) for r in doc["table"]]
    assert rows == [("prefill", 1, 24), ("decode", 2, 32), ("decode", 2, 32), ("decode", 2, 64)], rows
    for r in doc["table"]:
        assert r["rel_err"] < 1e-2, r  # bf16 tolerance of test_kernels.py
        assert_finite(r, ["us", "speedup_vs_jax", "speedup_vs_ref", "copy_frac"] if r["kind"] == "decode"
                      else ["us", "time_vs_dense", "dense_us"])
    assert_finite(doc["bars"], ["decode_speedup_vs_jax", "decode_bw_fraction_long",
                                "prefill_time_vs_dense_flash"])


def test_decode_splits_smoke_runs_on_cpu(tmp_path: Path, monkeypatch) -> None:
    """`python -m jtrail.bench.decode_splits --smoke`: the split-K sweep in interpret mode; every variant
    (old rule, unsplit, contiguous and strided splits) within bf16 tolerance of the jnp reference."""
    from jtrail.bench import decode_splits

    monkeypatch.setenv("OUT", str(tmp_path))
    decode_splits.main(["--smoke"])
    rows = load(tmp_path / "decode_splits.json")["shapes"]["b2_ctx32_w6"]
    assert sorted(rows) == sorted(decode_splits.SMOKE_VARIANTS)
    for name, r in rows.items():
        assert r["rel_err"] < 1e-2 and r["us_per_call"] > 0, (name, r)
