"""Routing policies on hand-made load snapshots, and token-aware routing in the simulator."""

import numpy as np
import pytest
from jtrail.serving.engine_api import EngineStats
from jtrail.serving.router import ROUTER_NAMES, LeastRequests, PowerOfTwo, RoundRobin, TokenAware, make_router
from jtrail.serving.sequence import InvalidRequestError
from jtrail.serving.simulator import Resources, Trace, simulate
from jtrail.serving.step_model import StepModel


def st(waiting=0, running=0, tokens=0.0, used=0, total=100):
    return EngineStats(waiting=waiting, running=running, outstanding_tokens=tokens, pages_used=used,
                       pages_total=total)


def test_round_robin_and_least_requests():
    stats = [st(5, 5), st(0, 1), st(2, 0)]
    rr = RoundRobin()
    assert [rr.choose(stats, 10) for _ in range(5)] == [0, 1, 2, 0, 1]
    assert LeastRequests().choose(stats, 10) == 1
    assert LeastRequests().choose([st(1, 1), st(0, 2)], 10) == 0  # tie: lowest index


def test_power_of_two_is_seeded_and_picks_the_lighter_of_two():
    stats = [st(9, 9), st(0, 0)]
    assert all(PowerOfTwo(seed=s).choose(stats, 1) == 1 for s in range(5))  # two replicas: both drawn
    many = [st(k, 0) for k in range(8)]
    a = [PowerOfTwo(seed=3).choose(many, 1) for _ in range(1)]
    p = PowerOfTwo(seed=3)
    picks = [p.choose(many, 1) for _ in range(400)]
    assert a[0] == picks[0]  # seeded
    assert 7 not in picks  # the most loaded replica always loses its pair
    # choosing the lighter of two: P(pick k) = (7 - k) / C(8, 2) for loads 0..7
    freq = np.bincount(picks, minlength=8) / 400
    np.testing.assert_allclose(freq, (7 - np.arange(8)) / 28, atol=0.06)


def test_token_aware_least_work_among_replicas_that_fit():
    stats = [st(1, 1, tokens=900), st(5, 5, tokens=300, used=99), st(3, 3, tokens=500)]
    ta = TokenAware(page_size=16)
    # needs ceil((40 + 60) / 16) = 7 pages: replica 1 has 1 free page, so replica 2 (least work that fits)
    assert ta.choose(stats, 40, 60.0) == 2
    assert ta.choose(stats, 4, 10.0) == 1  # 1 page: fits everywhere, least work wins
    full = [st(tokens=10, used=100), st(tokens=5, used=100)]
    assert ta.choose(full, 40, 60.0) == 1  # none fits: least work overall
    # with the slot count known, a free slot beats less work on a full replica
    slots = [st(0, 4, tokens=5000), st(2, 4, tokens=100)]
    assert TokenAware(num_slots=4).choose(slots, 4, 10.0) == 1  # both full: least work
    assert TokenAware(num_slots=5).choose(slots, 4, 10.0) == 0  # replica 0 has a free slot


def test_bad_input():
    with pytest.raises(InvalidRequestError):
        make_router("random")
    with pytest.raises(InvalidRequestError):
        RoundRobin().choose([], 1)
    with pytest.raises(InvalidRequestError):
        TokenAware(page_size=0)
    assert {make_router(n).name for n in ROUTER_NAMES} == set(ROUTER_NAMES)


def test_simulated_replicas_token_aware_beats_round_robin():
    # 4 replicas at ~90% load with heavy-tailed output lengths and exact predictions: knowing each
    # replica's outstanding tokens balances work that request counts cannot see
    rng = np.random.default_rng(0)
    n, replicas, slots = 6000, 4, 8
    out = np.clip(np.round(rng.lognormal(np.log(150), 1.0, n)), 1, 2000).astype(int)
    prm = rng.integers(10, 100, n)
    sm = StepModel(a=0.01, b=1e-4)
    res = Resources(num_slots=slots, num_pages=2000, page_size=16)
    step = sm.step_time(slots, 0)
    rate = 0.9 * replicas * slots / (step * out.mean())
    tr = Trace(np.cumsum(rng.exponential(1 / rate, n)), prm, out)
    mean = {}
    for name in ("round-robin", "least-requests", "token-aware"):
        router = make_router(name, num_slots=slots) if name == "token-aware" else make_router(name)
        r = simulate(tr, "fcfs", sm, res, num_replicas=replicas, router=router)
        assert np.bincount(r.replica, minlength=replicas).min() > n / (4 * replicas)  # all replicas used
        mean[name] = r.e2e.mean()
    assert mean["token-aware"] < mean["round-robin"]
    assert mean["token-aware"] < mean["least-requests"] * 1.05
