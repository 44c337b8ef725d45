"""A regime's trace with its recorded probe outputs, saved by benchmarks/serving.py and replayed offline
by benchmarks/tune_recorded.py: the file gives the simulator exactly what the run had."""

from __future__ import annotations

import numpy as np
import pytest
from jtrail.serving.brain.predictor import RecordedPredictor, TrailPredictor
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

from jtrail.bench.loadgen import Workload
from jtrail.bench.recorded_trace import load_recorded_trace, save_recorded_trace

EDGES = np.linspace(0, 320, 9)


def workload_and_records(n: int = 120, seed: int = 3) -> tuple[Workload, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 200, int(k))) for k in rng.integers(5, 120, n)]
    answers = [rng.integers(3, 200, int(k)) for k in rng.integers(1, 300, n)]
    ids = [f"R1-{i}" for i in range(n)]
    wl = Workload(prompts, np.cumsum(rng.exponential(0.02, n)), np.zeros(n), max_tokens=1024,
                  request_ids=ids, answers=answers)
    # noisy probe rows (float32, as the engine's recorder keeps them), one per generated-token count
    recs = {r: rng.dirichlet(np.ones(8), len(a) + 1).astype(np.float32).astype(np.float64)
            for r, a in zip(ids, answers, strict=True)}
    return wl, recs


def test_saved_trace_replays_as_the_run_had_it(tmp_path) -> None:
    wl, recs = workload_and_records()
    path = tmp_path / "trace_R1.npz"
    save_recorded_trace(path, wl, recs, slots=8, pages=400, page_size=16, preemption_mode="keep",
                        steps_in_flight=1, split="tune")
    got = load_recorded_trace(path)
    assert got.split == "tune" and got.request_ids == wl.request_ids and got.max_tokens == 1024
    assert got.resources == Resources(num_slots=8, num_pages=400, page_size=16, preemption="keep")
    assert got.steps_in_flight == 1
    assert all(np.array_equal(got.records[r], recs[r]) for r in recs)
    direct = Trace(wl.arrival, np.array([len(p) for p in wl.prompts]), wl.output_len,
                   request_ids=list(wl.request_ids), max_tokens=np.full(len(wl), 1024))
    sm = StepModel(a=0.003, b=2e-6, c=5e-8, d=0.002)

    def run(trace: Trace, records: dict[str, np.ndarray]) -> np.ndarray:
        pred = RecordedPredictor(TrailPredictor(EDGES), records)
        r = simulate(trace, "trail", sm, got.resources, predictor=pred, policy_kwargs={"c": 0.5},
                     finish_lag_steps=1)
        return r.e2e

    e2e = run(got.trace(), got.records)
    np.testing.assert_array_equal(e2e, run(direct, recs))
    later = got.trace(arrival=wl.arrival + 1.0)  # the same requests at other times
    assert later.request_ids == got.request_ids and np.allclose(later.arrival, wl.arrival + 1.0)


def test_tuning_refuses_a_benchmark_split_trace(tmp_path) -> None:
    import importlib.util
    from pathlib import Path

    wl, recs = workload_and_records(n=10)
    save_recorded_trace(tmp_path / "t.npz", wl, recs, slots=8, pages=400, page_size=16,
                        preemption_mode="keep", steps_in_flight=0, split="bench")
    np.savez(tmp_path / "s.npz", capacity=np.tile([[64, 1000, 0.003, 0, 8, 8, 0.0, 8, 0]], (50, 1))
             * np.linspace(1, 2, 50)[:, None])
    spec = importlib.util.spec_from_file_location(
        "tune_recorded", Path(__file__).resolve().parents[1] / "benchmarks" / "tune_recorded.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="benchmark split"):
        mod.main([str(tmp_path / "t.npz"), str(tmp_path / "s.npz"), "--out", str(tmp_path / "o.json")])
