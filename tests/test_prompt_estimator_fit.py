"""`jtrail train-prompt-estimator` end to end on a toy replay set: it fits on 'train' only (the saved
estimator is the fit of those pairs alone), scores 'tune' (the probe's first tune requests), records the
probe's tune metrics beside it; and the shipped estimator matches the shipped replay probe's bins."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jtrail.serving.brain.prompt_estimator import PromptLengthEstimator

from jtrail.cli import main
from jtrail.replay import ReplaySet

EDGES = [0.0, 8.0, 32.0, 128.0, 1024.0]


def _toy_replay(path, rng) -> ReplaySet:
    """Answer length grows with the count of token 5 in the prompt; 40 train, 12 tune, 6 bench, 6 ood."""
    splits = ["train"] * 40 + ["tune"] * 12 + ["bench"] * 6 + ["ood"] * 6
    prompts, answers = [], []
    for _ in splits:
        p = rng.integers(0, 16, rng.integers(2, 30)).astype(np.int32)
        log_n = 2.0 + 0.8 * np.log1p(np.sum(p == 5)) + 0.2 * rng.standard_normal()
        n = int(np.clip(np.expm1(log_n), 1, 1200))
        prompts.append(p)
        answers.append(rng.integers(0, 100, n).astype(np.int32))
    rs = ReplaySet(prompts, answers, [f"c{i}" for i in range(len(splits))], np.asarray(splits))
    rs.save(path)
    return rs


def test_cli_fits_on_train_scores_tune_and_writes_results(tmp_path, capsys):
    rs = _toy_replay(tmp_path / "r.npz", np.random.default_rng(0))
    probe = tmp_path / "probe"
    probe.mkdir()
    probe_tune = {"prefill_mae": 12.5, "mean_prefill_mae": 20.0, "prompt_only_mae": 15.0, "refined_mae": 9.0}
    meta = {"bins": "edges:toy", "tune_metrics": {"eval_requests": 10, **probe_tune}}
    (probe / "probe.json").write_text(json.dumps({"probe_config": {"bin_edges": EDGES}, "meta": meta}))
    out, results = tmp_path / "est.npz", tmp_path / "res.json"
    assert main(["train-prompt-estimator", "--replay", str(tmp_path / "r.npz"), "--probe", str(probe),
                 "--out", str(out), "--results", str(results), "--dims", "64"]) == 0
    got = PromptLengthEstimator.load(out)
    train = rs.subset("train")
    ref = PromptLengthEstimator.fit(train.prompts, np.minimum(train.answer_lengths(), 1024), EDGES, dims=64)
    assert np.allclose(got.weights, ref.weights) and got.bin_edges == tuple(EDGES) and got.l2 == ref.l2
    doc = json.loads(results.read_text())
    assert doc["command"].startswith("jtrail train-prompt-estimator") and doc["date"] and "git_commit" in doc
    assert doc["tune_metrics"]["requests"] == 10 and doc["tune_all_metrics"]["requests"] == 12
    assert doc["probe_tune_metrics"] == probe_tune
    tune = rs.subset("tune")
    y = np.minimum(tune.answer_lengths()[:10], 1024)
    mae = np.mean(np.abs(np.minimum([got.estimate(p) for p in tune.prompts[:10]], 1024) - y))
    assert doc["tune_metrics"]["mae_estimate"] == pytest.approx(mae)
    assert doc["tune_metrics"]["spearman"] > 0.3  # the planted signal ranks held-out answers
    assert json.loads(capsys.readouterr().out)["tune_metrics"] == doc["tune_metrics"]


def test_shipped_estimator_uses_the_shipped_replay_probe_bins():
    from jtrail.models.probe_io import read_probe_meta

    from jtrail.shipped import named_probe_path, prompt_estimator_beside

    probe_dir = named_probe_path("replay")
    est = prompt_estimator_beside(probe_dir)
    if est is None:
        pytest.skip("no prompt estimator shipped beside the replay probe in this install")
    cfg, _ = read_probe_meta(probe_dir)
    assert np.allclose(est.bin_edges, cfg.bin_edges) and est.probs([1, 2, 3]).shape == (cfg.num_bins,)
