"""Serving benchmark pieces: seeded arrivals, vLLM metrics, aging default, and forced-length runs of
the real engine (tiny random model) doing identical work under every policy."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.probe import ProbeConfig, ProbeHead
from jtrail.serving.brain.predictor import RecordingPredictor, TrailPredictor
from jtrail.serving.brain.scheduler.registry import make_policy
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import SamplingParams, Sequence

from jtrail.bench.loadgen import RunResult, Workload, arrival_times, drive_engine
from jtrail.bench.metrics import summarize
from jtrail.bench.serving_report import aging_tradeoff

CFG = NAMED_CONFIGS["tiny"].replace(tie_embeddings=False)


def test_arrivals_seeded_and_reproducible():
    a, b = arrival_times(500, 3.0, seed=7), arrival_times(500, 3.0, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, arrival_times(500, 3.0, seed=8))
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    np.testing.assert_array_equal(arrival_times(500, 3.0, seed=7, cv=2.0), arrival_times(500, 3.0, 7, 2.0))


@pytest.mark.parametrize("cv", [1.0, 2.0, 0.5])
def test_arrival_rate_and_burstiness(cv):
    rate, n = 5.0, 40_000
    gaps = np.diff(arrival_times(n, rate, seed=1, cv=cv))
    assert abs(gaps.mean() * rate - 1.0) < 0.03  # mean gap 1/rate
    assert abs(gaps.std() / gaps.mean() - cv) < 0.05 * cv + 0.02
    if cv == 1.0:  # Poisson: counts in unit windows have variance == mean
        counts = np.bincount(np.cumsum(gaps).astype(int))[:-1]
        assert abs(counts.var() / counts.mean() - 1.0) < 0.1


def test_summary_uses_vllm_definitions():
    res = RunResult(arrival=np.array([0.0, 1.0, 2.0]), first_token=np.array([0.5, 1.2, np.nan]),
                    finish=np.array([2.5, 1.2, np.nan]), output_tokens=np.array([5, 1, 0]),
                    preemptions=np.array([1, 0, 0]), itl=np.array([0.5, 0.5]), steps=np.zeros((0, 5)),
                    wall_s=3.0)
    s = summarize(res)
    assert s["completed"] == 2 and s["mean_e2e"] == pytest.approx((2.5 + 0.2) / 2)
    assert s["mean_ttft"] == pytest.approx((0.5 + 0.2) / 2)
    assert s["mean_tpot"] == pytest.approx((2.5 - 0.5) / 4)  # the 1-token request has no TPOT
    assert s["preemptions_per_request"] == pytest.approx(1 / 3)
    assert s["throughput_tok_s"] == pytest.approx(6 / 2.5)


def test_aging_default_keeps_p99_and_mean_gain():
    row = lambda name, aging, mean, p99: {"name": name, "aging": aging, "mean_e2e": mean, "p99_e2e": p99}
    top = {"fcfs": row("fcfs", 0, 10.0, 20.0), "trail": row("trail", 0.0, 4.0, 70.0),
           "a1": row("trail", 1.0, 5.0, 39.0), "a2": row("trail", 2.0, 6.5, 30.0),
           "a3": row("trail", 3.0, 8.0, 22.0)}
    pts, default = aging_tradeoff(top)
    assert [p["aging"] for p in pts] == [0.0, 1.0, 2.0, 3.0]
    assert default == "a1"  # best mean gain with p99 <= 2x fcfs (trail alone: 3.5x) and gain >= 1.4
    top["a1"]["p99_e2e"] = 45.0
    assert aging_tradeoff(top)[1] == "a2"
    top["a2"]["mean_e2e"] = 7.5  # gain 1.33 < 1.4: no default
    assert aging_tradeoff(top)[1] is None


def test_recorded_probe_rows_forward_filled():
    rec = RecordingPredictor(TrailPredictor(np.linspace(0, 40, 5)))

    s = Sequence("x", [1, 2], SamplingParams(max_tokens=100), 0.0)
    rec.on_prefill(s, np.array([0.1, 0.2, 0.3, 0.4]))
    s.output_ids.extend([5, 6, 7])
    rec.on_decode(s, np.array([1.0, 0, 0, 0]), 3)
    r = rec.records(["x", "unseen"], 4)
    assert r["x"].shape == (4, 4) and np.allclose(r["x"][2], [0.1, 0.2, 0.3, 0.4]) and r["x"][3, 0] == 1
    assert np.allclose(r["unseen"], 0.25)
    assert s.predicted_remaining is not None  # it still drives TRAIL refinement


@pytest.fixture(scope="module")
def tiny():
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(3))
    probe = ProbeHead(ProbeConfig(d_model=CFG.d_model, layer=0, bin_edges=(0, 4, 8, 12, 16), hidden=16),
                      rngs=nnx.Rngs(1))
    return model, probe


def _engine(tiny, policy: str, slots: int = 4, pages: int = 12, steps_in_flight: int | None = None
            ) -> LLMEngine:
    model, probe = tiny
    cfg = EngineConfig(num_slots=slots, page_size=4, num_pages=pages, max_model_len=48,
                       prefill_buckets=(8, 16, 32), max_prefill_tokens_per_step=32,
                       policy=make_policy(policy), steps_in_flight=steps_in_flight)
    return LLMEngine(model, None, cfg, probe=probe, predictor=TrailPredictor(probe.cfg.bin_edges))


@pytest.mark.parametrize("depth", [None, 2])
def test_forced_lengths_identical_work_across_policies(tiny, depth):
    """depth: the engine's steps in flight (None: this backend's default; 2: the GPU's)."""
    rng = np.random.default_rng(0)
    n = 70  # > 64 waiting requests turns on the policies' heap index (srpt-oracle ranks on arrival)
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(2, 20)).tolist() for _ in range(n)]
    lengths = rng.integers(1, 12, n)
    wl = Workload(prompts, np.zeros(n), lengths)  # everything at t=0: a full queue, preemptions
    seen = {}
    for policy in ("fcfs", "trail", "srpt-oracle"):
        res = drive_engine(_engine(tiny, policy, steps_in_flight=depth), wl, timeout_s=120)
        assert res.completed.all(), policy
        np.testing.assert_array_equal(res.output_tokens, lengths)  # exactly the forced length, no EOS stop
        assert np.all(res.first_token <= res.finish) and np.all(res.first_token >= res.arrival)
        assert res.steps.shape[1] == 9 and res.steps[:, 0].sum() >= lengths.sum()
        assert np.all(res.steps[:, 2] > 0)
        calls, dec = res.steps[:, 3].sum(), res.steps[:, 4].sum()
        # every first token comes from a prefill call, every other one from a decode (or a re-prefill)
        assert calls >= n and dec <= lengths.sum() - n and calls + dec >= lengths.sum()
        seen[policy] = summarize(res)
        # the step that delivered each request's last token (its record has the same time): on a t=0
        # burst the mean of these is the mean E2E counted in steps, which a stall of a loaded machine
        # does not move (it only lengthens a step)
        seen[policy]["mean_finish_step"] = np.searchsorted(res.steps[:, 6], res.finish).mean()
    assert len({s["output_tokens"] for s in seen.values()}) == 1
    # the orders differ: SRPT must finish short jobs earlier on average than FCFS on a t=0 burst
    assert seen["srpt-oracle"]["mean_finish_step"] < seen["fcfs"]["mean_finish_step"]


@pytest.mark.parametrize("depth", [1, 2])
def test_step_records_pair_with_the_batch_each_step_processed(tiny, depth):
    """Async scheduling: a step's record carries the counts of the batch whose outputs the step
    processed, dispatched `steps_in_flight` steps before; a step that processed none (the pipeline
    filling, or an empty step draining it) records zeros. Gaps between arrivals make empty steps."""
    eng = _engine(tiny, "fcfs", steps_in_flight=depth)
    processed_per_step: list[tuple[int, int, int]] = []
    real_step, real_process = eng.step, eng.outputs.process
    seen: list[tuple[int, int, int]] = []

    def process(batch, *args):
        seen.append((sum(len(c.tokens) for c in batch.prefills) + sum(r.steps for r in batch.decodes),
                     len(batch.prefills), len(batch.decodes)))
        return real_process(batch, *args)

    def step():
        seen.clear()
        outs = real_step()
        processed_per_step.append(seen[0] if seen else (0, 0, 0))
        return outs

    eng.outputs.process, eng.step = process, step
    rng = np.random.default_rng(1)
    n = 40
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(2, 12)).tolist() for _ in range(n)]
    wl = Workload(prompts, np.cumsum(rng.exponential(0.01, n)), rng.integers(1, 4, n))
    res = drive_engine(eng, wl, timeout_s=120)
    assert res.completed.all()
    got = [tuple(int(x) for x in row[[0, 3, 4]]) for row in res.steps]
    assert got == processed_per_step[:len(got)]
    assert any(p == (0, 0, 0) for p in got) and sum(p[2] for p in got) > 0


def test_replay_workload_emits_recorded_answers(tiny):
    """Replay: every request carries its recorded answer; every policy emits exactly those tokens (the
    same work), under a nominal max_tokens, and the steps say how many tokens each step emitted."""
    rng = np.random.default_rng(1)
    n = 12
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(2, 20)).tolist() for _ in range(n)]
    answers = [rng.integers(0, CFG.vocab_size, rng.integers(1, 15)) for _ in range(n)]
    wl = Workload(prompts, np.zeros(n), np.zeros(n), max_tokens=40, answers=answers)
    np.testing.assert_array_equal(wl.output_len, [len(a) for a in answers])
    assert wl.params(0).max_tokens == 40 and wl.params(0).forced_output_ids == tuple(answers[0])
    for policy in ("fcfs", "trail"):
        eng = _engine(tiny, policy)
        seqs = {}
        inner = eng.add_request

        def add(rid, *a, _inner=inner, _seqs=seqs, **kw):
            _seqs[rid] = _inner(rid, *a, **kw)
            return _seqs[rid]

        eng.add_request = add
        res = drive_engine(eng, wl, timeout_s=120)
        assert res.completed.all(), policy
        for i, rid in enumerate(wl.request_ids):
            assert seqs[rid].output_ids == answers[i].tolist()
        assert res.steps[:, 5].sum() == sum(len(a) for a in answers)
        assert np.all(np.diff(res.steps[:, 6]) >= 0) and res.steps[:, 7].max() <= eng.config.num_slots


def test_forced_lengths_under_a_nominal_max_tokens(tiny):
    """The engine sees max_tokens = the nominal cap (no exact upper bound leaks to the policies) and
    the driver stops each request at its forced length, freeing its pages."""
    rng = np.random.default_rng(1)
    n = 12
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(2, 20)).tolist() for _ in range(n)]
    lengths = rng.integers(1, 12, n)
    with pytest.raises(ValueError, match="below a forced length"):
        Workload(prompts, np.zeros(n), lengths, max_tokens=int(lengths.max()) - 1)
    wl = Workload(prompts, np.zeros(n), lengths, max_tokens=24)
    eng = _engine(tiny, "trail")
    seen = []
    inner = eng.policy.on_arrival
    eng.policy.on_arrival = lambda seq, now: (seen.append(seq.params.max_tokens), inner(seq, now))
    res = drive_engine(eng, wl, timeout_s=120)
    assert res.completed.all() and seen == [24] * n
    np.testing.assert_array_equal(res.output_tokens, lengths)
    assert not eng.has_unfinished() and eng.blocks.num_used == 0


def test_sim_trace_max_tokens_caps_predictions_not_the_truth():
    from jtrail.serving.brain.predictor import NoisyOraclePredictor
    from jtrail.serving.simulation.simulator import Resources, Trace, simulate
    from jtrail.serving.simulation.step_model import StepModel

    out = np.array([5, 40, 7, 30])
    seen: dict[int, list[float]] = {}

    class Spy(NoisyOraclePredictor):
        def sim_prefill(self, seq):
            super().sim_prefill(seq)
            seen.setdefault(int(seq.oracle_remaining_at_start), []).append(seq.predicted_remaining)

    for cap in (None, 64):
        seen.clear()
        tr = Trace(np.zeros(4), np.full(4, 3), out, max_tokens=cap)
        simulate(tr, "trail", StepModel(a=0.01), Resources(num_slots=2, num_pages=64),
                 predictor=Spy(sigma=2.0, seed=3))
        preds = {k: v[0] for k, v in seen.items()}
        if cap is None:  # capped at the true length: never above it
            assert all(p <= k for k, p in preds.items())
        else:  # the nominal cap only: a noisy estimate may exceed the truth
            assert all(p <= cap for p in preds.values()) and any(p > k for k, p in preds.items())
    with pytest.raises(Exception, match="max_tokens"):
        Trace(np.zeros(4), np.full(4, 3), out, max_tokens=10)


def test_grpc_target_streams_forced_lengths():
    import asyncio

    from jtrail.serving.engine.fake_runner import mock_engine
    from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig

    from jtrail.bench.loadgen import grpc_run

    lengths = np.array([3, 1, 5, 2, 4, 6])
    wl = Workload([[70, 71, 72]] * 6, arrival_times(6, 50.0, seed=0), lengths)

    async def main() -> RunResult:
        server = JtrailServer(mock_engine(num_slots=2), ServerConfig(port=0))
        await server.start()
        try:
            return await grpc_run(f"127.0.0.1:{server.port}", wl, timeout_s=30)
        finally:
            await server.stop(0)

    res = asyncio.run(main())
    assert res.completed.all()
    np.testing.assert_array_equal(res.output_tokens, lengths)
    assert np.all(res.first_token >= res.arrival) and np.all(res.finish >= res.first_token)
    assert len(res.itl) == int((lengths - 1).sum())
    # under a nominal cap the client leaves each stream at its forced length
    wl.max_tokens = 50
    res = asyncio.run(main())
    assert res.completed.all()
    np.testing.assert_array_equal(res.output_tokens, lengths)


class _DeviceQueueRunner:
    """A FakeRunner behind a device that runs one batch at a time for a + b * tokens seconds, in
    dispatch order; fetch waits for the batch's end (as a device sync does)."""

    A, B = 0.004, 0.002  # large beside the fake engine's own host time per step (~ms when loaded)

    def __init__(self, inner):
        self.inner, self.free_at = inner, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, batch):
        tokens = sum(len(c.tokens) for c in batch.prefills) + sum(r.steps for r in batch.decodes)
        cost = self.A + self.B * tokens
        self.free_at = max(self.free_at, time.perf_counter()) + cost
        return self.inner.execute(batch), self.free_at

    def fetch(self, handle):
        out, done_at = handle
        time.sleep(max(0.0, done_at - time.perf_counter()))
        return self.inner.fetch(out)


@pytest.mark.parametrize("async_on", [False, True])
def test_step_rows_pair_seconds_with_the_batch_they_waited_for(async_on):
    """Under async scheduling a step's seconds are the device time of the batch dispatched one step
    earlier: the driver's rows pair them, so the step model fitted on them finds the device's
    per-token cost either way (unpaired, the prefill steps' cost would land on the next row)."""
    from jtrail.serving.engine.fake_runner import FakeRunner
    from jtrail.serving.simulation.step_model import fit_step_model

    cfg = EngineConfig(num_slots=4, page_size=8, num_pages=64, max_model_len=96, prefill_buckets=(8, 16, 32),
                       max_prefill_tokens_per_step=32, async_scheduling=async_on)
    runner = _DeviceQueueRunner(FakeRunner(cfg.num_slots, cfg.max_model_len, cfg.page_size))
    eng = LLMEngine(None, None, cfg, runner=runner)
    rng = np.random.default_rng(5)
    n = 24
    prompts = [rng.integers(3, 200, rng.integers(4, 40)).tolist() for _ in range(n)]
    wl = Workload(prompts, np.zeros(n), rng.integers(2, 10, n))
    res = drive_engine(eng, wl, oracle=False, timeout_s=60)
    assert res.completed.all()
    _, fit = fit_step_model(res.steps)
    # sleeps overshoot a little on a loaded machine: that lands in a, not in the per-token slope
    assert abs(fit["b"] / _DeviceQueueRunner.B - 1) < 0.2, fit
    assert fit["r2"] > 0.8, fit
