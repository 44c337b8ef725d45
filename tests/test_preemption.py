"""The preemption cap and the cost rule: queueing arithmetic on tiny hand-made states."""

import math

import numpy as np
import pytest
from jtrail.serving.brain.scheduler.base import SchedulerState
from jtrail.serving.brain.scheduler.preemption_cost import RecomputeCost
from jtrail.serving.brain.scheduler.registry import make_policy
from jtrail.serving.sequence import InvalidRequestError, SamplingParams, Sequence, Status
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

UNIT = StepModel(a=1.0)  # every step 1 time unit, recompute free
ONE_SLOT = Resources(num_slots=1, num_pages=10_000, page_size=16)


@pytest.mark.parametrize("cap,e2e,pre", [(None, [24, 2.5, 2.5], [2, 0, 0]), (1, [22, 2.5, 17.5], [1, 0, 0]),
                                         (0, [20, 20.5, 17.5], [0, 0, 0])])
def test_cap_on_preemptions_per_request(cap, e2e, pre):
    # One slot. A (20 tokens) from t=0. B (2) arrives at 1.5, picked up at t=2: A has 18 left > 2,
    # preempted; B runs 2..4; A resumes with 18 left. C (2) arrives at 6.5, picked up at t=7: A has
    # 15 left. No cap: A preempted again, C runs 7..9, A done at 9 + 15 = 24. Cap 1: A keeps its slot
    # (done 4 + 18 = 22), C waits: done 24, E2E 17.5. Cap 0: never preempt: B 20..22, C 22..24.
    tr = Trace(np.array([0.0, 1.5, 6.5]), np.ones(3, int), np.array([20, 2, 2]))
    r = simulate(tr, "srpt-oracle", UNIT, ONE_SLOT, policy_kwargs={"max_preemptions": cap})
    np.testing.assert_allclose(r.e2e, e2e)
    np.testing.assert_array_equal(r.preemptions, pre)


def seq(rid: str, prompt: int, generated: int, remaining: float, running: bool, arrival: float = 0.0):
    s = Sequence(rid, [0] * prompt, SamplingParams(max_tokens=4096), arrival)
    s.output_ids = [0] * generated
    s.status = Status.RUNNING if running else Status.WAITING
    s.predicted_remaining = s.initial_prediction = float(remaining)
    return s


# a = 0.01 s, b = 0.001 s/token, c = 1e-4 s/KV token, d = 0.05 s/call, 64-token chunks
COST = {"a": 0.01, "b": 0.001, "c": 1e-4, "d": 0.05, "prefill_chunk": 64}


def decide(policy, running, waiting):
    st = SchedulerState(waiting=waiting, running=running, free_slots=0, free_pages=10_000,
                        total_pages=10_000, page_size=16, now=1.0)
    for w in waiting:
        policy.on_arrival(w, 0.5)
    return policy.schedule(st)


@pytest.mark.parametrize("r_v,victim", [(35, "U"), (36, "U"), (60, "V")])
def test_cost_rule_takes_largest_net_saving(r_v, victim):
    # Running V (100 prompt + 10 generated = 110 tokens) and U (20 + 0); waiting W, R_W = 10.
    # tau = a + b N + c KV = 0.01 + 0.002 + 1e-4 * 130 = 0.025 s; M = 2 running + 1 waiting = 3.
    # delta_V = b 110 + d ceil(110/64) = 0.11 + 0.10 = 0.21 s -> cost 0.63 s;
    # delta_U = b 20 + d = 0.07 s -> cost 0.21 s; U's saving (20 - 10) x 0.025 = 0.25: net 0.04.
    # V's net: (r_v - 10) x 0.025 - 0.63: -0.005 (35), +0.02 (36), +0.62 (60). Largest net wins.
    v, u = seq("V", 100, 10, r_v, True), seq("U", 20, 0, 20, True)
    w = seq("W", 5, 0, 10, False, arrival=0.9)
    pol = make_policy("trail", aging=0.0, c=math.inf, preempt_cost=COST)
    d = decide(pol, [v, u], [w])
    assert [s.request_id for s in d.preempt] == [victim]
    assert d.admit == [w]
    cost = RecomputeCost(**COST)
    assert cost.step_time([v, u]) == pytest.approx(0.025)
    assert cost.recompute_time(v) == pytest.approx(0.21)
    assert cost.net_gain(r_v, 10, v, 0.025, 3) == pytest.approx((r_v - 10) * 0.025 - 0.63)


def test_cost_rule_blocks_when_recompute_outweighs_saving():
    # Only V runs (110 tokens): tau = 0.01 + 0.001 + 0.011 = 0.022; M = 2; cost 0.42 s.
    # R_V - R_W = 19 -> 0.418 s < 0.42: no preemption; 20 -> 0.44 > 0.42: preempt.
    # Without the cost rule both preempt (rank 29 > 10).
    for gap, expect in ((19, []), (20, ["V"])):
        v, w = seq("V", 100, 10, 10 + gap, True), seq("W", 5, 0, 10, False, arrival=0.9)
        d = decide(make_policy("trail", aging=0.0, c=math.inf, preempt_cost=COST), [v], [w])
        assert [s.request_id for s in d.preempt] == expect
        v, w = seq("V", 100, 10, 10 + gap, True), seq("W", 5, 0, 10, False, arrival=0.9)
        plain = make_policy("trail", aging=0.0, c=math.inf)
        assert [s.request_id for s in decide(plain, [v], [w]).preempt] == ["V"]


def test_cap_in_schedule_and_validation():
    v, w = seq("V", 10, 1, 500, True), seq("W", 5, 0, 10, False, arrival=0.9)
    v.num_preemptions = 2
    assert decide(make_policy("trail", aging=0.0, c=math.inf, max_preemptions=2), [v], [w]).preempt == []
    v2, w2 = seq("V", 10, 1, 500, True), seq("W", 5, 0, 10, False, arrival=0.9)
    v2.num_preemptions = 1
    assert decide(make_policy("trail", aging=0.0, c=math.inf, max_preemptions=2), [v2], [w2]).preempt == [v2]
    with pytest.raises(InvalidRequestError, match="max_preemptions"):
        make_policy("trail", max_preemptions=-1)
    with pytest.raises(InvalidRequestError, match="preempt_cost"):
        make_policy("trail", preempt_cost={"a": 0.01, "bogus": 1})
    with pytest.raises(InvalidRequestError, match="preempt_cost.d"):
        make_policy("trail", preempt_cost={"d": -1.0})
    got = make_policy("trail", preempt_cost=StepModel(a=0.1, d=0.2)).cost
    assert got == RecomputeCost(a=0.1, b=0, c=0, d=0.2)


def test_fcfs_watermark_keeps_free_pages():
    # 100 pages, watermark 0.1 -> 10 pages stay free. Waiting requests of 160 + 1 tokens need 11 pages.
    w = [seq(f"w{i}", 160, 0, 0, False, arrival=float(i)) for i in range(5)]
    pol = make_policy("fcfs", watermark=0.1)
    st = SchedulerState(waiting=w, running=[], free_slots=8, free_pages=50, total_pages=100, page_size=16,
                        now=5)
    # 50 - 11k >= 10 -> k <= 3
    assert pol.schedule(st).admit == w[:3]
    assert make_policy("fcfs").schedule(st).admit == w
    with pytest.raises(InvalidRequestError, match="only `watermark`"):
        make_policy("fcfs", c=0.5)
