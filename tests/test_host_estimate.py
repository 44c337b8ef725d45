"""trail's `arrival_estimate="host"` on the real engine over the fake runner: each arriving request gets
the prompt estimator's probabilities through the predictor's on_prefill, no probe-only prefill runs,
waiting requests are admitted in the estimator's order, the real prefill's probe output then replaces
the estimate, and every request's tokens are the ones the default (probe) mode produces."""

from __future__ import annotations

import numpy as np
import pytest
from jtrail.serving.brain.predictor import TrailPredictor
from jtrail.serving.brain.prompt_estimator import PromptLengthEstimator
from jtrail.serving.brain.scheduler.registry import make_policy
from jtrail.serving.engine.fake_runner import ByteTokenizer, FakeLengthPredictor, FakeRunner
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import InvalidRequestError, SamplingParams

EDGES = (0.0, 8.0, 32.0, 128.0, 512.0, 1024.0)
# arrival order; the estimator below predicts each prompt's own length, so it admits 1, 3, 2, 0
PROMPT_LENS = [100, 3, 40, 12]
MAX_TOKENS = 128  # above the estimates: a prediction is capped at max_tokens, which would tie them


def length_estimator() -> PromptLengthEstimator:
    """log(answer + 1) = log(prompt length + 1): the estimate is the prompt's length (an order a test
    can state), spread with sigma 0.3 over EDGES."""
    dims = 4
    w = np.zeros(dims + 1)
    w[dims] = 1.0
    return PromptLengthEstimator(w, 0.0, EDGES, sigma=0.3, dims=dims, l2=1.0)


class EstimateThenProbe:
    """TRAIL's predictor for the estimator's bin probabilities; the fake probe's output (one value: the
    exact remaining length) as FakeLengthPredictor installs it. Records every on_prefill's width."""

    bin_edges = EDGES
    refine_every = 1

    def __init__(self):
        self.trail, self.fake = TrailPredictor(EDGES), FakeLengthPredictor()
        self.prefills: dict[str, list[int]] = {}

    def on_prefill(self, seq, probs):
        self.prefills.setdefault(seq.request_id, []).append(len(probs))
        (self.trail if len(probs) == len(EDGES) - 1 else self.fake).on_prefill(seq, probs)

    def on_decode(self, seq, probs, n_new):
        self.fake.on_decode(seq, probs, n_new)


def make_engine(arrival_estimate: str, async_on: bool = False, estimator=None, predictor=None) -> LLMEngine:
    cfg = EngineConfig(num_slots=1, num_pages=64, page_size=16, max_model_len=256,
                       policy=make_policy("trail", aging=0.0, arrival_estimate=arrival_estimate),
                       async_scheduling=async_on)
    runner = FakeRunner(cfg.num_slots, cfg.max_model_len, cfg.page_size, probe=True)
    return LLMEngine(None, ByteTokenizer(), cfg, runner=runner, predictor=predictor or EstimateThenProbe(),
                     prompt_estimator=estimator)


def run(engine: LLMEngine) -> tuple[list[str], dict[str, list[int]]]:
    """Admission order and each request's output tokens."""
    seqs = [engine.add_request(f"r{i}", [10 + i] * n, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            for i, n in enumerate(PROMPT_LENS)]
    outputs: dict[str, list[int]] = {s.request_id: [] for s in seqs}
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.request_id] += o.new_token_ids
    admitted = sorted(seqs, key=lambda s: s.first_admitted_time)
    return [s.request_id for s in admitted], outputs


@pytest.mark.parametrize("async_on", [False, True])
def test_host_estimate_ranks_waiting_requests_without_probe_prefills(async_on):
    engine = make_engine("host", async_on, estimator=length_estimator())
    first = engine.add_request("x", [9] * 50, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert first.predicted_remaining is not None  # estimated at add_request, before any step
    engine.abort("x")
    order, outputs = run(engine)
    assert engine.probe_calls == 0 and engine.probe_tokens == 0
    assert order == ["r1", "r3", "r2", "r0"]  # by estimated length, not arrival
    # the estimate at arrival (K bins), then the real prefill's probe output (the fake probe: 1 value)
    assert {rid: w for rid, w in engine.predictor.prefills.items() if rid != "x"} == \
        {f"r{i}": [len(EDGES) - 1, 1] for i in range(4)}
    probe_engine = make_engine("probe", async_on)
    probe_order, probe_outputs = run(probe_engine)
    assert probe_engine.probe_calls > 0  # the default still probes waiting requests
    assert probe_order != order and probe_outputs == outputs  # another order, the same tokens
    assert all(len(t) == MAX_TOKENS for t in outputs.values())


def test_host_needs_an_estimator_a_predictor_and_the_same_bins():
    with pytest.raises(InvalidRequestError) as e:
        make_engine("host", estimator=None)
    assert e.value.field == "prompt_estimator"
    cfg = EngineConfig(num_slots=1, num_pages=64, page_size=16, max_model_len=256,
                       policy=make_policy("trail", arrival_estimate="host"))
    with pytest.raises(InvalidRequestError) as e:
        LLMEngine(None, ByteTokenizer(), cfg, runner=FakeRunner(1, 256, 16, probe=True),
                  prompt_estimator=length_estimator())
    assert e.value.field == "predictor"
    with pytest.raises(InvalidRequestError, match="differ") as e:
        make_engine("host", estimator=length_estimator(), predictor=TrailPredictor((0.0, 10.0, 1024.0)))
    assert e.value.field == "prompt_estimator"


def test_arrival_estimate_and_probe_hold_are_validated_and_default_to_probe_at_once():
    assert make_policy("trail").arrival_estimate == "probe"
    with pytest.raises(InvalidRequestError) as e:
        make_policy("trail", arrival_estimate="guess")
    assert e.value.field == "arrival_estimate"
    assert make_policy("trail").probe_hold_s == 0.2 and make_policy("fcfs").probe_hold_s == 0.0
    for bad in (-0.1, float("nan"), float("inf"), "soon"):
        with pytest.raises(InvalidRequestError) as e:
            make_policy("trail", probe_hold_s=bad)
        assert e.value.field == "probe_hold_s"


@pytest.mark.parametrize(("flags", "want"), [([], "probe"), (["--arrival-estimate", "host"], "host"),
                                             (["--arrival-estimate", "probe"], "probe")])
def test_serve_flag_reaches_trail(flags, want):
    from jtrail.cli import build_parser
    from jtrail.serve import engine_config

    args = build_parser().parse_args(["serve", "--mock", "--policy", "trail", *flags])
    assert engine_config(args).policy.arrival_estimate == want


def test_serve_probe_hold_flag_reaches_trail_and_bad_values_name_the_field():
    from jtrail.cli import build_parser
    from jtrail.serve import engine_config

    args = build_parser().parse_args(["serve", "--mock", "--policy", "trail", "--probe-hold-s", "0.2"])
    assert engine_config(args).policy.probe_hold_s == 0.2
    args = build_parser().parse_args(["serve", "--mock", "--policy", "trail", "--probe-hold-s", "-1"])
    with pytest.raises(InvalidRequestError) as e:
        engine_config(args)
    assert e.value.field == "probe_hold_s"


def test_simulator_runs_host_specs_with_free_arrival_estimates(monkeypatch):
    """sim_vs_engine: a "host" spec is simulated with its estimate at arrival (no device time): the
    estimator's probs for each prompt when given one; the default spec with the engine's probe-only
    prefills (predict_at_arrival False)."""
    from types import SimpleNamespace

    from jtrail.serving.simulation import sim_vs_engine

    seen = {}

    def fake_simulate(trace, name, sm, res, **kw):
        arrival = kw["arrival_predictor"]
        rows = None if arrival is None else {k: v.tolist() for k, v in arrival.records.items()}
        seen[kw["policy_kwargs"].get("arrival_estimate", "probe")] = (kw["predict_at_arrival"], rows)
        return SimpleNamespace(summary=lambda: {"mean_e2e": 1.0}, wall_seconds=0.0)

    monkeypatch.setattr(sim_vs_engine, "simulate", fake_simulate)
    wl = SimpleNamespace(arrival=np.array([0.0]), prompts=[[1, 2]], output_len=np.array([3]),
                         request_ids=["r0"])
    specs = {"trail": ("trail", {}), "trail-host": ("trail", {"arrival_estimate": "host"})}
    est = length_estimator()
    sim_vs_engine.simulate_policies(wl, specs, None, None, TrailPredictor(EDGES), {}, est)
    assert seen == {"probe": (False, None), "host": (True, {"r0": [est.probs([1, 2]).tolist()]})}
    sim_vs_engine.simulate_policies(wl, specs, None, None, TrailPredictor(EDGES), {})
    assert seen == {"probe": (False, None), "host": (True, None)}  # no estimator: the probe's at arrival


def test_simulator_arrival_predictor_ranks_then_the_prefill_estimate_replaces_it():
    """One slot; r1 and r2 wait while r0 runs. The arrival estimates (reversed lengths) put r2 first;
    each request then gets exactly one prefill estimate from `predictor`, at its prefill."""
    from jtrail.serving.brain.predictor import OraclePredictor
    from jtrail.serving.simulation.simulator import Resources, Trace, simulate
    from jtrail.serving.simulation.step_model import StepModel

    class Reversed(OraclePredictor):
        def sim_prefill(self, seq):
            seq.predicted_remaining = 100.0 - seq.oracle_remaining_at_start
            seq.prediction_epoch += 1

    class Counting(OraclePredictor):
        def __init__(self):
            self.calls: list[int] = []

        def sim_prefill(self, seq):
            self.calls.append(seq._idx)
            super().sim_prefill(seq)

    trace = Trace([0.0, 1e-6, 2e-6], [10, 10, 10], [5, 10, 20])
    res, sm = Resources(num_slots=1, num_pages=100, page_size=16), StepModel(a=1e-3)
    kw = {"aging": 0.0}
    counting = Counting()
    host = simulate(trace, "trail", sm, res, predictor=counting, policy_kwargs=kw,
                    arrival_predictor=Reversed())
    assert host.e2e[2] < host.e2e[1]  # ranked by the arrival estimates
    assert sorted(counting.calls) == [0, 1, 2]  # one prefill estimate each, none at arrival
    oracle = simulate(trace, "trail", sm, res, predictor=OraclePredictor(), policy_kwargs=kw)
    assert oracle.e2e[1] < oracle.e2e[2]


def test_sim_replica_makes_no_probe_prefills_for_host():
    """The simulator's model of the probe-only prefill (a waiting arrival's prompt joins the next
    step's prefill call) is off for a host policy, as on the engine."""
    from jtrail.serving.brain.predictor import OraclePredictor
    from jtrail.serving.simulation.sim_replica import SimReplica, SimSequence
    from jtrail.serving.simulation.step_model import StepModel

    def probes_after_arrivals(**policy_kw) -> list[int]:
        rep = SimReplica(make_policy("trail", **policy_kw), StepModel(a=1e-3), 1, 400, 16, "recompute",
                         OraclePredictor(), lambda s: None, None, 512)
        for i in range(3):  # one slot: the second and third must wait
            s = SimSequence(f"r{i}", [], SamplingParams(max_tokens=9), 0.0, oracle_remaining_at_start=9)
            s._plen, s._idx = 20, i
            rep.arrive(s, 0.0)
        return list(rep._probes)

    # probing at once: two probe-only prefills of 20 tokens in the next step
    assert probes_after_arrivals(probe_hold_s=0.0) == [20, 20]
    assert probes_after_arrivals() == []  # the default holds them for an admission's prefill call
    assert probes_after_arrivals(arrival_estimate="host", probe_hold_s=0.0) == []


@pytest.mark.parametrize(("flags", "says"), [
    (["--policy", "fcfs", "--arrival-estimate", "host"], "--arrival-estimate applies to --policy trail"),
    (["--arrival-estimate", "host", "--probe", "none"], "--arrival-estimate host needs a probe"),
    # the default probe (natural generation) ships no prompt estimator
    (["--arrival-estimate", "host"], "no prompt estimator at"),
    (["--arrival-estimate", "host", "--mock"], "needs the model-backed engine, not --mock"),
])
def test_serve_refuses_a_host_estimate_it_cannot_run_before_loading_a_model(flags, says, capsys):
    from jtrail.serve import main

    assert main(["--port", "0", "--http-port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "model loaded" not in err


def test_serve_preflight_accepts_the_replay_probes_host_estimate():
    import argparse

    from jtrail.preflight import check_arrival_estimate

    ns = argparse.Namespace(policy="trail", arrival_estimate="host", probe="replay", mock=False)
    check_arrival_estimate(ns)  # the shipped replay probe carries prompt_estimator.npz
    check_arrival_estimate(argparse.Namespace(policy="fcfs", arrival_estimate=None, probe=None, mock=False))
