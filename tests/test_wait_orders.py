"""Waiting-queue orders of trail beyond linear aging (multiplicative aging, HRRN, a starvation guard),
on hand-made traces with exact queueing arithmetic: unit step model (every step 1 time unit, prefill
free), one slot, so a request of n tokens holds the slot for n steps and the queue is ordered only when
the slot frees. Ranks are the true lengths (the simulator's default predictor)."""

import math

import numpy as np
import pytest
from jtrail.serving.brain.predictor import ProbeLikePredictor
from jtrail.serving.brain.scheduler.aging import Aging
from jtrail.serving.brain.scheduler.registry import make_policy
from jtrail.serving.sequence import InvalidRequestError, SamplingParams, Sequence
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

UNIT = StepModel(a=1.0)
ONE_SLOT = Resources(num_slots=1, num_pages=10_000, page_size=16)


def run(arrivals, lengths, **kw):
    kw = {"c": 0.0, "aging": 0.0, **kw}
    tr = Trace(np.array(arrivals, float), np.ones(len(lengths), int), np.array(lengths))
    return simulate(tr, "trail", UNIT, ONE_SLOT, policy_kwargs=kw)


def test_multiplicative_aging_by_hand():
    # shorts of 2 tokens at t = 0, 2, 4, ... keep the slot busy; a long one (50) arrives at 0.5.
    # rate 0.5 / s: key log(rank + 1) + 0.5 * arrival. Long: log 51 + 0.25 = 4.18; a short arriving
    # at ta: log 3 + 0.5 ta, below 4.18 for ta < 0.5 + 2 log 17 = 6.17: the shorts at 0, 2, 4, 6 go
    # first, the long is admitted at 8 (done 58) and the short of 8 waits for it (done 60).
    shorts = [2.0 * k for k in range(30)]
    arrivals = sorted(shorts + [0.5])
    lengths = [50 if a == 0.5 else 2 for a in arrivals]
    r = run(arrivals, lengths, aging=0.5, aging_form="exp")
    assert r.e2e[arrivals.index(0.5)] == pytest.approx(58 - 0.5)
    assert r.e2e[arrivals.index(6.0)] == pytest.approx(2.0)
    assert r.e2e[arrivals.index(8.0)] == pytest.approx(60 - 8)


def test_multiplicative_static_key_orders_like_the_effective_rank():
    ag = Aging(0.3, "exp")
    reqs = [(400.0, 0.0), (20.0, 5.0), (90.0, 2.0), (0.0, 9.0), (1000.0, 1.0)]  # (rank, arrival)
    for now in (9.0, 15.0, 60.0):
        by_key = sorted(reqs, key=lambda x: ag.static_key(*x))
        by_eff = sorted(reqs, key=lambda x: ag.effective(x[0], x[1], now))
        assert by_key == by_eff
    assert ag.effective(99.0, 0.0, math.log(2) / 0.3) == pytest.approx(49.0)  # (99 + 1) halves


def test_hrrn_by_hand():
    # A (10) at 0 runs 0..10. At 10 the ratios wait / length: C (5, at 0.5) 9.5/5 = 1.9, D (1, at 8)
    # 2/1 = 2, B (2, at 9) 1/2 = 0.5: D runs 10..11. At 11: C 10.5/5 = 2.1, B 2/2 = 1: C 11..16, B 16..18.
    # (SRPT: D, B, C; FCFS: C, D, B: HRRN is neither.)
    r = run([0, 0.5, 8, 9], [10, 5, 1, 2], order="hrrn")
    np.testing.assert_allclose(r.e2e, [10, 15.5, 3, 9])


def test_starvation_guard_by_hand():
    # A (4) at 0 finishes at 4: mean E2E 4, guard factor 1 -> bound 4 s of waiting. L (20) arrives at 1,
    # shorts (2) at 3, 5, 7, ... At 4 L has waited 3 < 4: SRPT runs S3 (4..6, E2E 3; mean 4 + (3 - 4)/64).
    # At 6 L has waited 5 > 3.98: it goes first (6..26); the short of 5 then runs 26..28.
    shorts = [3.0 + 2 * k for k in range(12)]
    arrivals = [0.0, 1.0, *shorts]
    lengths = [4, 20] + [2] * len(shorts)
    r = run(arrivals, lengths, order="guard", guard=1.0)
    np.testing.assert_allclose(r.e2e[:4], [4, 25, 3, 23])
    starved = run(arrivals, lengths)  # pure SRPT: L after every short
    assert starved.e2e[1] == pytest.approx(4 + 2 * len(shorts) + 20 - 1)


def test_order_options_are_checked():
    with pytest.raises(InvalidRequestError, match="order"):
        make_policy("trail", order="lifo")
    with pytest.raises(InvalidRequestError, match="aging_form"):
        make_policy("trail", aging_form="quadratic")
    with pytest.raises(InvalidRequestError, match="guard"):
        make_policy("trail", order="guard", guard=0.0)


def test_probe_like_prior_shrinks_the_prefill_estimate():
    edges = (0.0, 256.0, 512.0, 768.0, 1024.0)

    def est(prior, true_len):
        p = ProbeLikePredictor(sigma0=2.0, seed=0, max_tokens=1024, edges=edges, prior=prior)
        s = Sequence("x", [0], SamplingParams(max_tokens=true_len, ignore_eos=True), 0.0)
        s.oracle_remaining_at_start = true_len
        p.sim_prefill(s)
        return s.predicted_remaining

    # a prior with all but no weight outside the first bin holds the estimate at its middle (128)
    assert est([1.0, 1e-9, 1e-9, 1e-9], 900) == pytest.approx(128.0, abs=1.0)
    with pytest.raises(ValueError, match="prior"):
        ProbeLikePredictor(edges=edges, prior=[1.0, 1.0])
