"""Policies on hand-made traces with exact queueing arithmetic.

Unit step model (every step takes 1 time unit, prefill is free), one batch slot: a request of n tokens
occupies the slot for n steps, arrivals are picked up at the next step boundary.
"""

import math

import numpy as np
import pytest
from jtrail.serving.brain.scheduler import waitqueue
from jtrail.serving.brain.scheduler.base import SchedulerState
from jtrail.serving.brain.scheduler.gittins import GittinsPolicy, gittins_index
from jtrail.serving.brain.scheduler.memory import MemoryGuard
from jtrail.serving.brain.scheduler.registry import POLICY_NAMES, make_policy
from jtrail.serving.sequence import InvalidRequestError, SamplingParams, Sequence, Status
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

UNIT = StepModel(a=1.0)
ONE_SLOT = Resources(num_slots=1, num_pages=10_000, page_size=16)


def run(policy, arrivals, lengths, priority=None, **kw):
    if policy == "trail":  # the pure rule: trail's default aging (100 tokens/s) would swamp unit-time ranks
        kw.setdefault("aging", 0.0)
        kw.setdefault("aging_form", "linear")
    tr = Trace(np.array(arrivals, float), np.ones(len(lengths), int), np.array(lengths), priority=priority)
    return simulate(tr, policy, UNIT, ONE_SLOT, policy_kwargs=kw or None)


def test_srpt_order_without_preemption_need():
    # all at t=0, lengths 5, 3, 8: SRPT serves 3 (done 3), 5 (done 8), 8 (done 16)
    np.testing.assert_allclose(run("srpt-oracle", [0, 0, 0], [5, 3, 8]).e2e, [8, 3, 16])
    np.testing.assert_allclose(run("trail", [0, 0, 0], [5, 3, 8]).e2e, [8, 3, 16])
    np.testing.assert_allclose(run("fcfs", [0, 0, 0], [5, 3, 8]).e2e, [5, 8, 16])
    # priority: lower value first, then arrival
    np.testing.assert_allclose(run("priority", [0, 0, 0], [5, 3, 8], priority=np.array([1, 2, 0])).e2e,
                               [13, 16, 8])


def test_srpt_preempts_longer_running_request():
    # A (10 tokens) from t=0; B (2) arrives at 3.5, picked up at t=4 when A has 6 left > 2: preempt.
    # B runs 4..6; A resumes (recompute is free here) with 6 left: done at 12.
    r = run("srpt-oracle", [0, 3.5], [10, 2])
    np.testing.assert_allclose(r.e2e, [12, 2.5])
    np.testing.assert_array_equal(r.preemptions, [1, 0])
    np.testing.assert_allclose(r.ttft, [1, 1.5])


@pytest.mark.parametrize("arrive,preempted", [(3.5, True), (4.5, True), (5.5, False)])
def test_trail_cutoff_at_c_times_initial_prediction(arrive, preempted):
    # c = 0.5, initial prediction 10: A is preemptible while generated <= 5 (boundary inclusive).
    # B picked up at ceil(arrive): A has generated ceil(arrive) tokens.
    r = run("trail", [0, arrive], [10, 2], c=0.5)
    pick = math.ceil(arrive)
    if preempted:
        np.testing.assert_allclose(r.e2e, [12, pick + 2 - arrive])
        assert r.preemptions[0] == 1
    else:  # past the cutoff: never preempted, B waits for A
        np.testing.assert_allclose(r.e2e, [10, 12 - arrive])
        assert r.preemptions.sum() == 0


@pytest.mark.parametrize("margin,preempted", [(3.0, True), (4.0, False)])
def test_trail_margin(margin, preempted):
    # at t=4 A's remaining is 6, B's is 2: preempt only if 6 > 2 + margin
    r = run("trail", [0, 3.5], [10, 2], c=0.8, margin=margin)
    assert r.preemptions[0] == (1 if preempted else 0)
    np.testing.assert_allclose(r.e2e, [12, 2.5] if preempted else [10, 8.5])


def test_c_zero_never_preempts():
    r = run("trail", [0, 0.5], [10, 2], c=0)
    np.testing.assert_allclose(r.e2e, [10, 11.5])
    assert r.preemptions.sum() == 0


def test_aging_bounds_the_wait_of_a_long_request():
    # shorts of 2 tokens at t = 0, 2, 4, ... keep the slot 100% busy; a long one (50) arrives at 0.5.
    shorts = [2.0 * k for k in range(60)]
    arrivals = sorted(shorts + [0.5])
    lengths = [50 if a == 0.5 else 2 for a in arrivals]
    li = arrivals.index(0.5)
    starved = run("trail", arrivals, lengths, c=0)
    assert starved.e2e[li] == pytest.approx(120 + 50 - 0.5)  # pure SRPT: served after every short
    # aging 4 tokens/s: long's key 50 + 4*0.5 = 52; a short arriving at ta has key 2 + 4 ta, so shorts
    # arriving at <= 12 go first (key <= 50) and the long is admitted at t = 14, done at 64.
    aged = run("trail", arrivals, lengths, c=0, aging=4.0)
    assert aged.e2e[li] == pytest.approx(64 - 0.5)
    # the bound: admitted by the overtake time 0.5 + 50/4 plus one short service
    assert aged.e2e[li] - 50 <= 0.5 + 50 / 4 + 2


def mk(i, prompt, pred, gen=0, status=Status.WAITING, arrival=None):
    t = float(i if arrival is None else arrival)
    s = Sequence(f"s{i}", [0] * prompt, SamplingParams(max_tokens=1000), t, status=status)
    s.output_ids = [0] * gen
    s.predicted_remaining = float(pred)
    s.initial_prediction = float(pred + gen)
    return s


def test_memory_watermark_admission():
    # 100 pages of 16 tokens, 10 free, watermark 5%: 5 kept free.
    # running: 16 tokens, predicted 32 more -> 3 pages at the end, holds 1: reserve 2. Budget 10-5-2 = 3.
    run_ = mk(0, 16, 32, status=Status.RUNNING)
    w = [mk(1, 10, 5), mk(2, 20, 10), mk(3, 5, 20)]  # pages: ceil(15/16)=1, ceil(30/16)=2, ceil(25/16)=2
    pol = make_policy("trail", memory=MemoryGuard(watermark=0.05))
    st = SchedulerState(w, [run_], free_slots=8, free_pages=10, total_pages=100, page_size=16, now=10.0)
    assert pol.schedule(st).admit == [w[0], w[1]]  # 1 + 2 = 3 pages; the third does not fit: stop
    st.free_pages = 12  # budget 5: all three (1 + 2 + 2)
    assert make_policy("trail", watermark=0.05).schedule(st).admit == w
    plain = make_policy("trail")  # no guard: slots decide
    st.free_pages = 1
    assert plain.schedule(st).admit == w


def test_peak_pages_bounds_the_exact_timeline():
    """PeakGate.peak_pages against a step-by-step count: request j holds ceil((n_j + t) / page) pages at
    step t <= r_j. The gate counts each request's last page as one more whole page, so it is >= the
    exact peak and at most the requests alive at that peak above it."""
    rng = np.random.default_rng(0)
    gate = MemoryGuard(mode="peak").gate(SchedulerState([], [], 1, 0, 10_000, 16, 0.0))
    for _ in range(200):
        k = int(rng.integers(1, 8))
        r, n = rng.integers(0, 300, k), rng.integers(1, 500, k)
        exact = max(sum(-(-(n[j] + t) // 16) for j in range(k) if r[j] >= t) for t in range(int(r.max()) + 1))
        got = gate.peak_pages([(float(a), int(b)) for a, b in zip(r, n, strict=True)])
        assert exact <= got <= exact + k


def test_peak_admission_counts_finishes_reserve_does_not():
    # 100 pages of 1 token, no watermark. Running: 10 tokens, predicted 80 more (it peaks at 91 + its
    # next token). A short request (5 tokens, 20 more) ends long before: peak admits it (at t = 20 the
    # two hold 11 + 20 and 6 + 20 tokens, +1 page each for the next token: 59; at t = 80, 92), while
    # reserve holds the running request's 80 pages of growth and has 90 - 80 = 10 free: it refuses.
    run_ = mk(0, 10, 80, status=Status.RUNNING)
    short, long_ = mk(1, 5, 20), mk(2, 5, 100)
    st = SchedulerState([short], [run_], free_slots=4, free_pages=90, total_pages=100, page_size=1, now=5.0)
    assert make_policy("trail", watermark=0.0, memory_mode="peak").schedule(st).admit == [short]
    assert make_policy("trail", watermark=0.0).schedule(st).admit == []
    # a long one (5 + 100 tokens) would exceed 100 pages on its own: peak refuses it
    st.waiting = [long_]
    assert make_policy("trail", watermark=0.0, memory_mode="peak").schedule(st).admit == []
    # with nothing running, the first in line is admitted whatever it needs (no deadlock)
    st.running = []
    assert make_policy("trail", watermark=0.0, memory_mode="peak").schedule(st).admit == [long_]
    with pytest.raises(InvalidRequestError, match="mode") as e:
        make_policy("trail", memory_mode="half")
    assert e.value.field == "memory_mode"


def test_victim_least_work_and_longest():
    a, b, c = mk(0, 100, 5, gen=50), mk(1, 10, 300, gen=2), mk(2, 40, 50, gen=1)
    assert make_policy("trail", memory=True, victim="least_work").choose_victim([a, b, c], 0.0) is b
    assert make_policy("trail").choose_victim([a, b, c], 0.0) is b  # longest predicted
    b.initial_prediction = 10.0  # b: 2 > 0.1 * 10, past its cutoff
    pol = make_policy("trail", c=0.1)  # only c (1 <= 0.1*51) is preemptible: prefer it
    assert pol.choose_victim([a, b, c], 0.0) is c and pol.stats.victims == 1


def test_gittins_index_by_hand():
    e, m = np.array([0.0, 2, 4]), np.array([1.0, 3])
    # thresholds: d=2: P=.5, E=.5*1+2*.5=1.5 -> 1/3; d=4: P=1, E=2 -> 1/2
    assert gittins_index(np.array([0.5, 0.5]), e, m) == pytest.approx(0.5)
    # likely short but possibly very long: Gittins ranks it before a sure 20, the mean (55.5) does not
    e, m = np.array([0.0, 10, 20, 1000]), np.array([5.0, 15, 510])
    g = gittins_index(np.array([0.9, 0.0, 0.1]), e, m)
    assert g == pytest.approx(0.9 / 5.5)
    pol = GittinsPolicy(bin_edges=e)
    risky, sure = mk(0, 4, 55.5), mk(1, 4, 20.0)
    risky.posterior, sure.posterior = np.array([0.9, 0.0, 0.1]), np.array([0.0, 1.0, 0.0])
    assert pol.rank(risky) == pytest.approx(5.5 / 0.9) and pol.rank(sure) == pytest.approx(15)
    st = SchedulerState([sure, risky], [], 1, 100, 100, 16, 0.0)
    assert pol.schedule(st).admit == [risky]
    assert make_policy("trail", aging=0.0).schedule(st).admit == [sure]


def test_index_path_equals_plain_sort(monkeypatch):
    # a long queue (> SMALL) takes the heap path; forcing the plain sort must give identical results
    rng = np.random.default_rng(1)
    n = 300
    lengths = rng.integers(1, 200, n)
    arr = np.sort(rng.uniform(0, 0.7 * lengths.sum() / 4, n))
    tr = Trace(arr, rng.integers(1, 50, n), lengths)
    res = Resources(num_slots=4, num_pages=200, page_size=16)
    sm = StepModel(a=1.0, b=0.01, c=0.001)
    kw = dict(c=0.8, margin=2.0, aging=0.5, aging_form="linear", memory=True)
    rebuilds = []
    orig = waitqueue.WaitIndex.rebuild
    spy = lambda self, w: (rebuilds.append(len(w)), orig(self, w))
    monkeypatch.setattr(waitqueue.WaitIndex, "rebuild", spy)
    fast = simulate(tr, "trail", sm, res, policy_kwargs=kw)
    calls = fast.policy_stats[0].schedule_calls
    assert rebuilds and max(rebuilds) > waitqueue.SMALL and len(rebuilds) < calls / 10  # heap path, mostly
    monkeypatch.setattr(waitqueue, "SMALL", 10**9)
    slow = simulate(tr, "trail", sm, res, policy_kwargs=kw)
    np.testing.assert_array_equal(fast.e2e, slow.e2e)
    np.testing.assert_array_equal(fast.preemptions, slow.preemptions)
    # the engine passes no step clock: running sequences are sorted each call instead of kept in a heap
    def engine_like():
        pol = make_policy("trail", **kw)
        inner = pol.schedule
        pol.schedule = lambda st: inner(SchedulerState(**{**vars(st), "step": None}))
        return pol
    sorted_run = simulate(tr, engine_like, sm, res)
    np.testing.assert_array_equal(fast.e2e, sorted_run.e2e)
    assert fast.preemptions.sum() > 0


def test_registry_and_errors():
    assert set(POLICY_NAMES) >= {"fcfs", "priority", "srpt-oracle", "trail", "gittins"}
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    with pytest.raises(InvalidRequestError):
        make_policy("lifo")
    with pytest.raises(InvalidRequestError):
        make_policy("trail", bogus=1)
    with pytest.raises(InvalidRequestError):
        make_policy("trail", c=-1)
    with pytest.raises(InvalidRequestError):
        make_policy("trail", aging=-2)
    with pytest.raises(InvalidRequestError):
        make_policy("trail", victim="random")
    with pytest.raises(InvalidRequestError):
        make_policy("trail", watermark=1.5)


def test_trail_defaults_are_the_ones_tuned_on_the_simulator():
    # benchmarks/tune_recorded.py (the simulator fed the probe's outputs recorded on the tuning split,
    # under the engine's default preemption mode, keep) records its choice; the shipped policy and the
    # engine's default mode must be that choice
    import json
    from pathlib import Path

    from jtrail.serving.brain.scheduler.preemption_cost import RecomputeCost
    from jtrail.serving.engine.config import EngineConfig
    from jtrail.serving.simulation.simulator import Resources

    doc = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                      / "tune_recorded.json").read_text())
    assert doc["split"] == "tune"
    tuned = doc["choice_options"]
    pol = make_policy("trail")
    pol.on_preemption_mode("keep")
    assert pol.c == tuned["c"]
    assert (pol.aging.rate, pol.aging.form) == (tuned["aging"], tuned.get("aging_form", "linear"))
    assert pol.max_preemptions == tuned["max_preemptions"]
    assert pol.cost == RecomputeCost.coerce(tuned["preempt_cost"]) and pol.cost is not None
    assert pol.arrival_estimate == "probe"
    assert EngineConfig().preemption_mode == Resources(num_slots=1, num_pages=2).preemption == "keep"


def test_recorded_search_rule() -> None:
    """benchmarks/tune_recorded.py's rule: trail settings that meet R1's bars, R2's p99 and the
    preemption limit everywhere and keep TTFT >= 3x at the heavier R1 load; the smallest worst p99."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "tune_recorded", Path(__file__).resolve().parents[1] / "benchmarks" / "tune_recorded.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(gain=1.1, ttft=4.0, p99=1.1, oracle=1.0, pre=0.2):
        return {"fcfs_over_x_mean_e2e": gain, "fcfs_over_x_mean_ttft": ttft, "x_over_fcfs_p99_e2e": p99,
                "x_over_oracle_mean_e2e": oracle, "preemptions_per_request": pre}

    a, b, c = "trail cost", "trail cap 1", "trail c=0.8"
    table = {"R1": {a: row(p99=1.2), b: row(p99=1.1), c: row(p99=1.0)},
             "R1-0.97": {a: row(p99=1.24), b: row(p99=1.3), c: row(ttft=2.9)},  # c: TTFT too small here
             "R2": {a: row(p99=1.1), b: row(p99=1.1), c: row(p99=1.0)}}
    assert mod.choose(table) == (a, 1.24)  # b's worst p99 (1.3, at R1-0.97) is larger
    r3 = {"R3": {lab: row(p99=2.0, pre=0.9) for lab in (a, b, c)}}  # reported, not part of the rule
    assert mod.choose({**table, **r3}) == (a, 1.24)
    table["R2"][a]["preemptions_per_request"] = 0.6
    assert mod.choose(table) == (b, 1.3)
    table["R1"][b]["fcfs_over_x_mean_e2e"] = 1.04
    assert mod.choose(table) == (None, None)
    assert mod.choose({"R1": table["R1"]}) == (None, None)  # not every setting: no choice


def test_memory_search_candidates_and_rule():
    """benchmarks/tune_preemption.py --memory: every candidate is a valid policy, and the rule takes the
    largest R3 gain among trail rows under the preemption limit whose p99 is no worse anywhere."""
    from jtrail.bench.memory_tuning import PREEMPTION_LIMIT, choose, memory_candidates

    for name, kw in memory_candidates().values():
        make_policy(name, **kw)

    def row(gain, p99, pre=0.0):
        return {"fcfs_over_x_mean_e2e": gain, "p99_e2e": p99, "preemptions_per_request": pre}

    r1 = {lab: row(1.0, 5.0) for lab in ("trail, no guard", "trail peak 0.1", "trail peak 1")}
    r3 = {"trail, no guard": row(1.40, 9.0, 0.7), "trail peak 0.1": row(1.45, 8.0, PREEMPTION_LIMIT),
          "trail peak 1": row(1.50, 9.5, 0.0), "srpt-oracle": row(2.0, 5.0)}
    table = {"R1": r1, "R3": r3}
    assert choose(table) == "trail peak 0.1"  # peak 1 gains more but its p99 is worse than no guard's
    table["R3"]["trail peak 0.1"]["preemptions_per_request"] = 0.4
    assert choose(table) == "trail, no guard"  # none qualifies


def test_trail_probe_hold_default_is_the_simulator_choice():
    # results/tune_probe_hold.json: the hold with the best geometric mean of fcfs/trail mean E2E over R1
    # and R2 (the regimes where requests wait for slots and get probed); the smallest of those within
    # 0.5% of the best (a shorter hold delays a newcomer's estimate less; 0.2 s and 1 s differ by 0.01%)
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                      / "tune_probe_hold.json").read_text())
    holds = {lab: row["options"]["probe_hold_s"] for lab, row in doc["rows"].items()
             if row["options"].keys() == {"probe_hold_s"} and not row["free_first_estimate"]}
    table = doc["table"]
    gain = {h: math.sqrt(table["R1"][lab]["fcfs_over_x_mean_e2e"] * table["R2"][lab]["fcfs_over_x_mean_e2e"])
            for lab, h in holds.items()}
    best = min(h for h, g in gain.items() if g >= 0.995 * max(gain.values()))
    assert make_policy("trail").probe_hold_s == best


def test_an_estimate_that_arrives_while_waiting_refiles_the_request():
    """A waiting request ranks as `unknown_rank` until its probe-only prefill's estimate arrives; the
    policy then re-files it under the estimate (on_estimate). On the heap path (a long queue) a stale
    key that ranks worse than the fresh one would otherwise keep it behind requests it should pass."""
    pol = make_policy("trail", unknown_rank=1000.0, aging=0.0)
    waiting = [Sequence(f"w{i}", [1] * 8, SamplingParams(max_tokens=1000), float(i)) for i in range(100)]
    for s in waiting:
        pol.on_arrival(s, s.arrival_time)
    state = SchedulerState(waiting, [], free_slots=0, free_pages=10_000, total_pages=10_000, page_size=16,
                           now=200.0)
    pol.schedule(state)  # builds the index (over SMALL waiting: the heap path)
    late = waiting[-1]
    late.predicted_remaining = late.initial_prediction = 5.0  # its probe said: short
    pol.on_estimate(late)
    state.free_slots = 1
    assert pol.schedule(state).admit == [late]


def test_trail_preempts_by_rank_only_where_the_engine_keeps_the_kv():
    """c left unset: 0.5 under "keep" (the tuned choice), 0 under recompute and swap (a preemption costs a
    recompute or a copy); the engine and a simulated replica tell the policy their mode. A c given is
    kept. A mode the engine does not know is refused by name, in the engine and the simulator."""
    from jtrail.serving.engine.config import EngineConfig
    from jtrail.serving.engine.fake_runner import ByteTokenizer, FakeRunner
    from jtrail.serving.engine.llm_engine import LLMEngine
    from jtrail.serving.simulation.sim_replica import SimReplica
    from jtrail.serving.simulation.step_model import StepModel

    for mode, want in (("keep", 0.5), ("recompute", 0.0), ("swap", 0.0)):
        cfg = EngineConfig(num_slots=2, num_pages=40, page_size=4, max_model_len=64, prefill_buckets=(8, 16),
                           max_prefill_tokens_per_step=16, preemption_mode=mode, policy=make_policy("trail"))
        engine = LLMEngine(None, ByteTokenizer(), cfg, runner=FakeRunner(2, 64, 4))
        assert engine.policy.c == want and engine.policy.preempt == (want > 0), mode
        rep = SimReplica(make_policy("trail"), StepModel(a=1e-3), 2, 40, 4, mode, None, lambda s: None)
        assert rep.policy.c == want and rep.policy.preempt == (want > 0), mode
        given = make_policy("trail", c=0.8)
        given.on_preemption_mode(mode)
        assert given.c == 0.8 and given.preempt
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(preemption_mode="drop")
    with pytest.raises(InvalidRequestError, match="preemption"):
        Resources(num_slots=1, num_pages=2, preemption="drop")
