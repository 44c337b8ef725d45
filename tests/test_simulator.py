"""The simulator against queueing theory, against itself stepping one step at a time, and its model."""

import numpy as np
import pytest
from jtrail.serving.brain.predictor import NoisyOraclePredictor, RecordedPredictor, TrailPredictor
from jtrail.serving.sequence import InvalidRequestError
from jtrail.serving.simulation.queueing import mg1_fcfs_mean_response, mg1_srpt_mean_response
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel


def mg1_trace(n, rho, seed, tick):
    rng = np.random.default_rng(seed)
    out = np.maximum(1, np.round(rng.lognormal(np.log(800), 0.6, n))).astype(int)
    lam = rho / (out.mean() * tick)
    return Trace(np.cumsum(rng.exponential(1 / lam, n)), np.ones(n, int), out), lam


@pytest.mark.parametrize("policy,formula", [("fcfs", mg1_fcfs_mean_response),
                                            ("srpt-oracle", mg1_srpt_mean_response)])
def test_single_slot_matches_mg1_theory(policy, formula):
    # one slot, step time = 1 ms per token, free prefill/recompute: an M/G/1 queue (preemptive-resume
    # for SRPT, at token granularity). Theory evaluated on the same sampled sizes.
    tick = 1e-3
    tr, lam = mg1_trace(40_000, 0.75, seed=7, tick=tick)
    r = simulate(tr, policy, StepModel(a=tick), Resources(num_slots=1, num_pages=100_000))
    theory = formula(lam, tr.output_len * tick)
    assert abs(r.e2e.mean() / theory - 1) < 0.05
    if policy == "fcfs":
        assert r.preemptions.sum() == 0


def test_srpt_beats_fcfs_by_theory_ratio():
    tick = 1e-3
    tr, lam = mg1_trace(20_000, 0.85, seed=3, tick=tick)
    s = tr.output_len * tick
    res = Resources(num_slots=1, num_pages=100_000)
    sim = simulate(tr, "fcfs", StepModel(a=tick), res).e2e.mean() / simulate(
        tr, "srpt-oracle", StepModel(a=tick), res).e2e.mean()
    theory = mg1_fcfs_mean_response(lam, s) / mg1_srpt_mean_response(lam, s)
    assert theory > 1.5 and abs(sim / theory - 1) < 0.1


def random_trace(n=400, seed=0, load=0.9, slots=8):
    rng = np.random.default_rng(seed)
    out = rng.integers(1, 300, n)
    prompt = rng.integers(1, 200, n)
    sm = StepModel(a=0.01, b=1e-4, c=2e-6)
    per_tok = sm.a / slots + sm.b + sm.c * 300
    arr = np.sort(rng.uniform(0, out.sum() * per_tok / load, n))
    return Trace(arr, prompt, out), sm


@pytest.mark.parametrize("policy,kw,mode", [
    ("fcfs", None, "recompute"), ("trail", {"c": 0.8, "margin": 5}, "recompute"),
    ("trail", {"c": 0.8, "max_preemptions": 1, "preempt_cost": {"a": 0.01, "b": 1e-4, "c": 2e-6, "d": 0.002}},
     "recompute"),
    ("gittins", None, "swap"), ("srpt-oracle", {"memory": True}, "recompute"),
    ("trail", {"c": 0.8, "max_preemptions": 2}, "keep")])
def test_event_jumps_equal_step_by_step(policy, kw, mode):
    # tight memory (forces victim preemptions) and several slots: jumping over steps must give exactly
    # the per-step simulation's results
    tr, sm = random_trace()
    res = Resources(num_slots=8, num_pages=120, page_size=16, preemption=mode)
    jump = simulate(tr, policy, sm, res, policy_kwargs=kw)
    step = simulate(tr, policy, sm, res, policy_kwargs=kw, max_jump_steps=1)
    np.testing.assert_allclose(jump.e2e, step.e2e, rtol=1e-9)
    np.testing.assert_allclose(jump.ttft, step.ttft, rtol=1e-9)
    np.testing.assert_array_equal(jump.preemptions, step.preemptions)
    assert np.all(np.isfinite(jump.e2e)) and np.all(jump.e2e >= jump.ttft) and np.all(jump.ttft > 0)
    if policy != "fcfs" or mode != "recompute":
        return
    assert jump.preemptions.sum() > 0  # memory was tight enough to matter


def test_keep_resumes_free_and_holds_its_pages(monkeypatch):
    """"keep": with pages to spare a kept request resumes at no cost, as the simulator's swap (whose
    transfer is not priced) does: the same latencies. With pages tight, kept requests' pages count: the
    run differs from swap (their pages go first, then they recompute), and never uses more pages than
    there are."""
    tr, sm = random_trace(load=1.1)
    kw = {"c": 0.8, "max_preemptions": 2}
    ample = {m: simulate(tr, "trail", sm, Resources(num_slots=8, num_pages=100_000, preemption=m),
                         policy_kwargs=kw) for m in ("swap", "keep", "recompute")}
    np.testing.assert_allclose(ample["keep"].e2e, ample["swap"].e2e, rtol=1e-12)
    assert ample["keep"].preemptions.sum() > 0
    assert ample["recompute"].e2e.mean() > ample["keep"].e2e.mean()  # the recompute it saves
    from jtrail.serving.simulation.sim_replica import SimReplica

    peaks, kept_seen = [], []
    boundary = SimReplica.boundary

    def checked(self, t):  # after each boundary: the running and the kept requests' pages fit
        boundary(self, t)
        peaks.append(self.used_at(self.steps))
        kept_seen.append(len(self.kept))

    monkeypatch.setattr(SimReplica, "boundary", checked)
    tight = {m: simulate(tr, "trail", sm, Resources(num_slots=8, num_pages=120, preemption=m),
                         policy_kwargs=kw) for m in ("swap", "keep")}
    assert not np.allclose(tight["keep"].e2e, tight["swap"].e2e)
    assert max(peaks) <= 120 and max(kept_seen) > 0


def test_metrics_follow_vllm_definitions_on_a_hand_trace():
    # step = 0.5 + 0.1 * batch_tokens: request of prompt 10, 4 tokens alone at t=1:
    # prefill step 0.5 + 1.0 = 1.5 (first token at 2.5), three decode steps of 0.6: done at 4.3
    tr = Trace(np.array([1.0]), np.array([10]), np.array([4]))
    r = simulate(tr, "fcfs", StepModel(a=0.5, b=0.1), Resources(num_slots=2, num_pages=10))
    assert r.ttft[0] == pytest.approx(1.5) and r.e2e[0] == pytest.approx(3.3)
    assert r.tpot[0] == pytest.approx(0.6)
    s = r.summary()
    assert s["mean_tpot"] == pytest.approx(0.6) and s["p99_e2e"] == pytest.approx(3.3)


def test_step_model_closed_form_and_fit():
    sm = StepModel(a=0.02, b=3e-4, c=1e-6)
    kv0, n = 5000, 12
    brute = sum(sm.step_time(n, kv0 + i * n) for i in range(37))
    assert sm.decode_run_time(n, kv0, 37) == pytest.approx(brute)
    m = sm.steps_until(n, kv0, brute - 1e-9)
    assert m == 37 and sm.steps_until(n, kv0, brute + 1e-9) == 38
    rng = np.random.default_rng(0)
    bt, kv = rng.integers(1, 512, 200), rng.integers(0, 100_000, 200)
    y = np.array([sm.step_time(b, k) for b, k in zip(bt, kv, strict=True)])
    y *= 1 + 0.001 * rng.standard_normal(200)
    fit = StepModel.fit(bt, kv, y)
    assert fit.a == pytest.approx(0.02, rel=0.05) and fit.b == pytest.approx(3e-4, rel=0.05)
    assert fit.c == pytest.approx(1e-6, rel=0.05)
    with pytest.raises(InvalidRequestError):
        StepModel(a=-1)


def test_step_model_fits_prefill_calls_and_drops_negative_terms():
    rng = np.random.default_rng(1)
    bt, kv, calls = rng.integers(8, 600, 300), rng.integers(0, 4000, 300), rng.integers(0, 3, 300)
    truth = StepModel(a=0.005, b=2e-5, d=0.004)
    y = np.array([truth.step_time(b, k, c) for b, k, c in zip(bt, kv, calls, strict=True)])
    y = y * (1 + 0.001 * rng.standard_normal(300)) - 1e-9 * kv  # a tiny negative kv trend: noise
    fit = StepModel.fit(bt, kv, y, calls)
    assert fit.c == 0.0  # dropped, not clipped: the others are refitted without it
    assert fit.a == pytest.approx(0.005, rel=0.05) and fit.d == pytest.approx(0.004, rel=0.05)
    assert fit.b == pytest.approx(2e-5, rel=0.1)
    assert fit.step_time(100, 0, 2) == pytest.approx(0.005 + 100 * 2e-5 + 0.008, rel=0.05)


def test_recorded_and_noisy_predictors_drive_the_real_policy():
    tr, sm = random_trace(n=200, seed=5)
    edges = np.linspace(0, 320, 9)
    # a perfect recorded probe: one-hot on the true remaining bin at every token
    recs = {}
    for i, o in enumerate(tr.output_len):
        rem = o - np.arange(o + 1)
        recs[f"r{i}"] = np.eye(8)[np.clip(np.searchsorted(edges[1:-1], rem, side="right"), 0, 7)] + 1e-3
    res = Resources(num_slots=8, num_pages=400)
    rec = RecordedPredictor(TrailPredictor(edges, refine_every=8), recs)
    kw = {"c": 0.8}  # the paper's limited preemption (the default is c = 0): predictions steer it too
    good = simulate(tr, "trail", sm, res, predictor=rec, policy_kwargs=kw)
    noisy = simulate(tr, "trail", sm, res, predictor=NoisyOraclePredictor(sigma=1.5, refine_every=16, seed=2),
                     policy_kwargs=kw)
    fcfs = simulate(tr, "fcfs", sm, res)
    oracle = simulate(tr, "srpt-oracle", sm, res)
    assert oracle.e2e.mean() <= good.e2e.mean() < fcfs.e2e.mean()
    assert good.e2e.mean() < noisy.e2e.mean() * 1.02


def test_bad_inputs():
    with pytest.raises(InvalidRequestError):
        Trace(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(InvalidRequestError):
        Trace(np.array([1.0]), np.array([1]), np.array([0]))
    tr = Trace(np.array([0.0]), np.array([100]), np.array([100]))
    with pytest.raises(InvalidRequestError):  # does not fit in the KV cache
        simulate(tr, "fcfs", StepModel(a=1), Resources(num_slots=1, num_pages=4, page_size=16))
    with pytest.raises(InvalidRequestError):
        Resources(num_slots=0, num_pages=1)
    with pytest.raises(InvalidRequestError):
        simulate(tr, "fcfs", StepModel(a=1), Resources(num_slots=1, num_pages=100), num_replicas=2)


def test_probe_on_arrival_is_charged_one_prefill_call_per_step():
    """trail predicts a request that must wait by a probe-only prefill (as the engine does). The engine
    packs a step's prefill chunks into one call, so a step with probes costs the step model's per-call
    term once, however many it holds. Identical requests keep FCFS's order under trail, so the
    makespans differ by exactly the probe steps' calls."""
    n, d = 5, 10.0
    tr = Trace(np.array([0.0, 0.5, 0.5, 0.5, 12.5]), np.full(n, 8), np.full(n, 5))
    sm = StepModel(a=1.0, d=d)
    edges = np.linspace(0, 16, 5)
    recs = {f"r{i}": np.full((6, 4), 0.25) for i in range(n)}
    res = Resources(num_slots=1, num_pages=64)
    trail = simulate(tr, "trail", sm, res, predictor=RecordedPredictor(TrailPredictor(edges), recs),
                     predict_at_arrival=False, policy_kwargs={"probe_hold_s": 0.0})
    fcfs = simulate(tr, "fcfs", sm, res)
    assert trail.preemptions.sum() == 0
    # r0 finds the slot free (its real prefill predicts it); r1-r3 wait and arrive together: one
    # step probes all three (one call); r4 arrives during r0's decode steps, later: a second call
    assert trail.makespan == pytest.approx(fcfs.makespan + 2 * d)
    # probe_hold_s: the probes wait for a step that prefills anyway (an admission's), at no extra call
    held = simulate(tr, "trail", sm, res, policy_kwargs={"probe_hold_s": 1000.0},
                    predictor=RecordedPredictor(TrailPredictor(edges), recs), predict_at_arrival=False)
    assert held.makespan == pytest.approx(fcfs.makespan)
    # ... unless the oldest unprobed request has waited that long: 12 s after r1-r3's arrival, during
    # r0's decode, one step probes all four waiting (r4 arrived at 12.5): one call
    short = simulate(tr, "trail", sm, res, policy_kwargs={"probe_hold_s": 12.0},
                     predictor=RecordedPredictor(TrailPredictor(edges), recs), predict_at_arrival=False)
    assert short.makespan == pytest.approx(fcfs.makespan + d)
    free = simulate(tr, "trail", sm, res, predictor=RecordedPredictor(TrailPredictor(edges), recs),
                    predict_at_arrival=True)  # predictions given at arrival for free: no probe calls
    assert free.makespan == pytest.approx(fcfs.makespan)


def test_resources_from_an_engine_config():
    from jtrail.serving.engine.llm_engine import EngineConfig

    cfg = EngineConfig(num_slots=3, num_pages=65, page_size=4, preemption_mode="swap",
                       max_prefill_tokens_per_step=128)
    r = Resources.from_engine_config(cfg)
    # the engine's allocator keeps page 0 as its null page: 64 usable
    assert (r.num_slots, r.num_pages, r.page_size, r.preemption, r.prefill_chunk) == (3, 64, 4, "swap", 128)


def test_finish_lag_keeps_the_slot_as_the_async_engine_does():
    # one slot, two requests of 10 tokens at t=0, 10 ms a step: the second starts when the first's slot
    # is freed, 10 steps in (0.1 s) without a lag, 12 (0.12 s) with the engine's two steps in flight
    tr = Trace(np.zeros(2), np.array([1, 1]), np.array([10, 10]))
    res = Resources(num_slots=1, num_pages=10)
    for lag, (first, second) in ((0, (0.10, 0.20)), (2, (0.12, 0.24))):
        r = simulate(tr, "fcfs", StepModel(a=0.01), res, finish_lag_steps=lag)
        assert sorted(r.e2e) == pytest.approx([first, second])
    with pytest.raises(InvalidRequestError, match="finish_lag_steps"):
        simulate(tr, "fcfs", StepModel(a=0.01), res, finish_lag_steps=-1)
