"""PromptLengthEstimator: features, the ridge fit against numpy lstsq, l2 choice on held-out data,
probs over the bins against an independent normal CDF, the file round trip and typed file errors;
the fit script's Spearman against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from jtrail.serving.brain.predictor import TrailPredictor
from jtrail.serving.brain.prompt_estimator import (
    PromptEstimatorFileError,
    PromptLengthEstimator,
    prompt_features,
)
from jtrail.serving.sequence import SamplingParams, Sequence

EDGES = (0.0, 8.0, 32.0, 128.0, 512.0, 1024.0)


def _data(n: int = 60, dims: int = 8, seed: int = 0):
    """Prompts whose answer length grows with how often token 5 appears (a signal the bag can see:
    with dims >= 64, ids 0..15 land in 16 distinct buckets)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 16, rng.integers(2, 30)) for _ in range(n)]
    lengths = np.array([np.expm1(2.0 + 0.8 * np.log1p(np.sum(p == 5)) + 0.1 * rng.standard_normal())
                        for p in prompts])
    return prompts, np.maximum(lengths, 0.0), dims


def test_features_are_log_counts_of_hashed_ids_and_log_length():
    x = prompt_features([7, 7, 7, 9], dims=16)
    b7, b9 = (7 * 2654435761) % 2**32 % 16, (9 * 2654435761) % 2**32 % 16
    expect = np.zeros(17)
    expect[b7] += np.log1p(3)
    expect[b9] += np.log1p(1) if b9 != b7 else 0.0
    expect[16] = math.log(5)
    assert b7 != b9 and np.allclose(x, expect)


def test_fit_matches_an_augmented_lstsq_with_an_unpenalized_intercept():
    prompts, lengths, dims = _data()
    l2 = 3.0
    est = PromptLengthEstimator.fit(prompts, lengths, EDGES, dims=dims, l2=l2)
    x = np.stack([prompt_features(p, dims) for p in prompts])
    y = np.log1p(lengths)
    d = x.shape[1]
    # minimize |[x 1] w - y|^2 + l2 |w[:d]|^2: stack sqrt(l2) I under x, 0 under the intercept column
    a = np.block([[x, np.ones((len(y), 1))], [math.sqrt(l2) * np.eye(d), np.zeros((d, 1))]])
    ref, *_ = np.linalg.lstsq(a, np.concatenate([y, np.zeros(d)]), rcond=None)
    assert np.allclose(est.weights, ref[:d], atol=1e-8) and math.isclose(est.intercept, ref[d], abs_tol=1e-8)
    assert est.l2 == l2 and est.sigma > 0
    assert math.isclose(est.estimate(prompts[0]), math.expm1(x[0] @ ref[:d] + ref[d]), rel_tol=1e-9)


def test_l2_is_chosen_on_held_out_data_and_the_signal_ranks():
    prompts, lengths, dims = _data(n=200, dims=64)
    est = PromptLengthEstimator.fit(prompts, lengths, EDGES, dims=dims, l2=(1e-3, 1e4))
    assert est.l2 == 1e-3  # a huge penalty flattens a real signal: worse held out
    many = np.array([5] * 9 + [1])
    few = np.array([1] * 10)
    assert est.estimate(many) > est.estimate(few)


def test_probs_are_the_lognormal_mass_of_each_bin():
    from scipy.stats import norm

    prompts, lengths, dims = _data()
    est = PromptLengthEstimator.fit(prompts, lengths, EDGES, dims=dims, l2=1.0)
    for p in prompts[:5]:
        q = est.probs(p)
        mu = est.log_length(p)
        cdf = norm.cdf((np.log1p(np.asarray(EDGES[1:-1])) - mu) / est.sigma)
        ref = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
        assert q.shape == (len(EDGES) - 1,) and np.all(q >= 0)
        assert math.isclose(q.sum(), 1.0, abs_tol=1e-12) and np.allclose(q, ref, atol=1e-12)
    seq = Sequence("r", [1, 2], SamplingParams(max_tokens=1024), arrival_time=0.0)
    TrailPredictor(EDGES).on_prefill(seq, est.probs(prompts[0]))  # a probe-shaped output
    assert seq.predicted_remaining is not None


def test_file_round_trip(tmp_path):
    prompts, lengths, dims = _data()
    est = PromptLengthEstimator.fit(prompts, lengths, EDGES, dims=dims, l2=1.0)
    path = tmp_path / "est.npz"
    est.save(path)
    back = PromptLengthEstimator.load(path)
    assert (back.dims, back.l2, back.sigma, back.bin_edges) == (est.dims, est.l2, est.sigma, est.bin_edges)
    for p in prompts[:5]:
        assert back.estimate(p) == est.estimate(p) and np.array_equal(back.probs(p), est.probs(p))


def test_bad_files_raise_the_typed_error(tmp_path):
    prompts, lengths, dims = _data()
    est = PromptLengthEstimator.fit(prompts, lengths, EDGES, dims=dims, l2=1.0)
    good = tmp_path / "good.npz"
    est.save(good)
    with np.load(good) as z:
        fields = {k: z[k] for k in z.files}
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in fields.items() if k != "sigma"})
    future = tmp_path / "future.npz"
    np.savez(future, **{**fields, "format_version": 99})
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, **{**fields, "weights": fields["weights"][:-1]})
    cases = {tmp_path / "absent.npz": "cannot read", garbage: "cannot read", truncated: "cannot read",
             missing: "missing", future: "format version 99", wrong_shape: "weights"}
    for path, words in cases.items():
        with pytest.raises(PromptEstimatorFileError, match=words):
            PromptLengthEstimator.load(path)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from jtrail.probe.prompt_estimator_fit import spearman

    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 50), rng.integers(0, 7, 50) + rng.integers(0, 5, 50)
    assert math.isclose(spearman(a, b), spearmanr(a, b).statistic, abs_tol=1e-12)


def test_counted_down_mae_by_hand():
    from jtrail.probe.prompt_estimator_fit import counted_down_mae

    # n=3, estimate 5, cap 4: estimates clip(5-j, 0, 4-j) = 4, 3, 2 vs truth 3, 2, 1 -> errors 1,1,1
    # n=1, estimate 0: 0 vs 1 -> 1
    assert counted_down_mae(np.array([5.0, 0.0]), np.array([3, 1]), max_tokens=4) == 1.0
