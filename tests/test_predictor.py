"""TRAIL refinement against posteriors computed by hand (2 and 3 bins, D = 1 and D > 1)."""

import numpy as np
import pytest
from jtrail.serving.brain.predictor import (
    NoisyOraclePredictor,
    OraclePredictor,
    Predictor,
    RecordedPredictor,
    SimPredictor,
    SyntheticProbe,
    TrailPredictor,
    transition_matrix,
)
from jtrail.serving.sequence import InvalidRequestError, SamplingParams, Sequence


def seq(max_tokens=100, oracle=None):
    sp = SamplingParams(max_tokens=max_tokens)
    return Sequence("r", [1, 2, 3], sp, 0.0, oracle_remaining_at_start=oracle)


def test_two_bins_d1_and_d2():
    # edges [0, 2, 4]: width 2, p = 1/2; T = [[1, 0], [.5, .5]]; midpoints 1, 3
    pr = TrailPredictor([0, 2, 4])
    np.testing.assert_allclose(pr.T, [[1, 0], [0.5, 0.5]])
    s = seq()
    pr.on_prefill(s, np.array([0.4, 0.6]))
    assert s.initial_prediction == pytest.approx(0.4 * 1 + 0.6 * 3)  # 2.2
    # D = 1: prior = [.4 + .6*.5, .6*.5] = [.7, .3]; times q = [.5, .5] -> [.35, .15] -> [.7, .3]
    pr.on_decode(s, np.array([0.5, 0.5]), 1)
    np.testing.assert_allclose(s.posterior, [0.7, 0.3])
    assert s.predicted_remaining == pytest.approx(0.7 + 0.9)
    # D = 2 from post0: T^2 = [[1, 0], [.75, .25]]; prior = [.4 + .45, .15]; q = [.2, .8] -> [.17, .12]
    s2 = seq()
    pr.on_prefill(s2, np.array([0.4, 0.6]))
    pr.refine(s2, np.array([0.2, 0.8]), 2)
    np.testing.assert_allclose(s2.posterior, np.array([0.17, 0.12]) / 0.29)
    assert s2.predicted_remaining == pytest.approx((0.17 * 1 + 0.12 * 3) / 0.29)
    assert s2.initial_prediction == pytest.approx(2.2)  # the initial estimate is kept


def test_three_bins_d1_and_d2():
    # edges [0, 4, 8, 12]: p = 1/4; midpoints 2, 6, 10
    pr = TrailPredictor([0, 4, 8, 12])
    post0, q = np.array([0.2, 0.3, 0.5]), np.array([0.1, 0.3, 0.6])
    # D = 1: prior = [.2 + .3*.25, .3*.75 + .5*.25, .5*.75] = [.275, .35, .375]
    s = seq()
    pr.on_prefill(s, post0)
    pr.refine(s, q, 1)
    un = np.array([0.275 * 0.1, 0.35 * 0.3, 0.375 * 0.6])
    np.testing.assert_allclose(s.posterior, un / un.sum())
    assert s.predicted_remaining == pytest.approx((un @ [2, 6, 10]) / un.sum())  # 8.2098
    assert s.predicted_remaining == pytest.approx(8.20979, abs=1e-4)
    # D = 2: T^2 rows by hand: [1,0,0], [.4375, .5625, 0], [.0625, .375, .5625]
    np.testing.assert_allclose(pr.power(2), [[1, 0, 0], [0.4375, 0.5625, 0], [0.0625, 0.375, 0.5625]])
    s = seq()
    pr.on_prefill(s, post0)
    pr.refine(s, q, 2)
    prior = np.array([0.2 + 0.3 * 0.4375 + 0.5 * 0.0625, 0.3 * 0.5625 + 0.5 * 0.375, 0.5 * 0.5625])
    un = prior * q
    np.testing.assert_allclose(s.posterior, un / un.sum())


def test_count_down_between_refinements_and_cap():
    pr = TrailPredictor([0, 4, 8, 12], refine_every=4)
    s = seq(max_tokens=7)
    pr.on_prefill(s, np.array([0.0, 0.0, 1.0]))
    assert s.predicted_remaining == 7.0  # 10, capped at max_tokens - generated = 7
    s.output_ids += [5, 5]
    pr.on_decode(s, np.array([0.0, 0.0, 1.0]), 2)  # 2 < 4 tokens: count down, no refinement
    assert s.predicted_remaining == 5.0 and s.tokens_since_refinement == 2
    post = s.posterior
    s.output_ids += [5, 5]
    pr.on_decode(s, np.array([0.0, 1.0, 0.0]), 2)  # 4 tokens since: refine with D = 4
    assert s.tokens_since_refinement == 0 and s.posterior is not post
    expected = post @ np.linalg.matrix_power(pr.T, 4) * [0, 1, 0]
    np.testing.assert_allclose(s.posterior, expected / expected.sum())
    assert s.predicted_remaining == 3.0  # 6, capped at 7 - 4


def test_log_bins_use_per_bin_width():
    t = transition_matrix([0, 1, 3, 7])  # widths 1, 2, 4
    np.testing.assert_allclose(t, [[1, 0, 0], [0.5, 0.5, 0], [0, 0.25, 0.75]])
    np.testing.assert_allclose(t.sum(axis=1), 1.0)


def test_bad_input_is_a_typed_error():
    with pytest.raises(InvalidRequestError):
        TrailPredictor([0, 2, 2])
    with pytest.raises(InvalidRequestError):
        TrailPredictor([0, 2, 4], refine_every=0)
    pr = TrailPredictor([0, 2, 4])
    with pytest.raises(InvalidRequestError):
        pr.on_prefill(seq(), np.array([0.5, 0.3, 0.2]))
    with pytest.raises(InvalidRequestError):
        pr.on_prefill(seq(), np.array([np.nan, 1.0]))
    with pytest.raises(InvalidRequestError):
        OraclePredictor().on_prefill(seq())


def test_oracle_noisy_and_recorded():
    s = seq(oracle=9)
    OraclePredictor().on_prefill(s)
    assert s.predicted_remaining == 9 and s.initial_prediction == 9
    s.output_ids += [1, 1]
    OraclePredictor().on_decode(s)
    assert s.predicted_remaining == 7
    a, b = seq(oracle=50), seq(oracle=50)
    NoisyOraclePredictor(sigma=0.5, seed=3).on_prefill(a)
    NoisyOraclePredictor(sigma=0.5, seed=3).on_prefill(b)
    assert a.predicted_remaining == b.predicted_remaining != 50  # seeded, and noisy
    rec = {"r": np.array([[0.4, 0.6], [0.5, 0.5]])}
    rp = RecordedPredictor(TrailPredictor([0, 2, 4]), rec)
    s = seq()
    rp.sim_prefill(s)
    s.output_ids.append(1)
    rp.sim_refine(s, 1)
    np.testing.assert_allclose(s.posterior, [0.7, 0.3])  # same numbers as the 2-bin hand case


def test_every_predictor_declares_the_hooks_its_callers_use():
    trail = TrailPredictor([0, 2, 4], refine_every=4)
    sim_side = [OraclePredictor(), NoisyOraclePredictor(sigma=0.1), RecordedPredictor(trail, {}),
                SyntheticProbe(trail)]
    assert isinstance(trail, Predictor) and not isinstance(trail, SimPredictor)  # needs real probe outputs
    for p in sim_side:  # the simulator's, and usable by the engine too
        assert isinstance(p, Predictor) and isinstance(p, SimPredictor), type(p).__name__


def test_refining_a_step_of_rows_at_once_equals_row_by_row():
    # the engine's vectorized path (one matrix product per distance) against on_decode per row, with
    # rows at different distances (multi-step decode), one not yet predicted, and refine_every > 1
    rng = np.random.default_rng(3)
    edges = np.linspace(0, 512, 9)
    for every in (1, 3):
        one, many = TrailPredictor(edges, refine_every=every), TrailPredictor(edges, refine_every=every)
        a, b = [seq(400) for _ in range(6)], [seq(400) for _ in range(6)]
        for i in range(5):  # the sixth row gets its first output from a decode step
            p = rng.dirichlet(np.ones(8))
            one.on_prefill(a[i], p)
            many.on_prefill(b[i], p)
        for _ in range(7):
            probs, n_new = rng.dirichlet(np.ones(8), size=6), rng.integers(1, 4, 6).tolist()
            for s_a, s_b, k in zip(a, b, n_new, strict=True):
                s_a.output_ids += [5] * k
                s_b.output_ids += [5] * k
            for s_a, q, k in zip(a, probs, n_new, strict=True):
                one.on_decode(s_a, q, k)
            many.on_decode_rows(b, probs, n_new)
            for s_a, s_b in zip(a, b, strict=True):
                assert s_b.predicted_remaining == pytest.approx(s_a.predicted_remaining, rel=1e-12)
                np.testing.assert_allclose(s_b.posterior, s_a.posterior, rtol=1e-12, atol=1e-15)
                assert (s_b.tokens_since_refinement, s_b.prediction_epoch) == (
                    s_a.tokens_since_refinement, s_a.prediction_epoch)
    with pytest.raises(InvalidRequestError, match="probs"):
        many.on_decode_rows(b[:2], np.array([[np.nan] * 8, [1.0] * 8]), [3, 3])
