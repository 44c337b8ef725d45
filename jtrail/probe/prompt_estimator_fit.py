"""Fit the host-side prompt estimator (serving/brain/prompt_estimator.py) on a replay set, and measure it.

Fit on "train" (its own held-out fifth chooses l2 and sigma), report on "tune" beside the replay probe's
prompt-only numbers on the same split (its probe.json `tune_metrics`). "bench" and "ood" are never read:
they stay unseen for the serving benchmark. The bins are the probe's (its probe.json `probe_config`),
so the estimator's `probs` feed the probe's TrailPredictor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from jtrail.models.errors import JtrailError
from jtrail.replay import ReplaySet
from jtrail.serving.brain.prompt_estimator import PromptLengthEstimator

MAX_NEW_TOKENS = 1024  # the replay probe's answer cap (its probe.json data.max_new_tokens)
PROBE_METRIC_KEYS = ("prefill_mae", "mean_prefill_mae", "prompt_only_mae", "refined_mae")


class PromptEstimatorFitError(JtrailError, ValueError):
    """Inputs the fit cannot use (a probe directory without bins, a replay set without a split)."""


def probe_bins(probe_dir: str | Path) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The probe's bin edges and its metadata, from probe.json alone (no JAX)."""
    path = Path(probe_dir) / "probe.json"
    try:
        doc = json.loads(path.read_text())
        return tuple(float(e) for e in doc["probe_config"]["bin_edges"]), doc.get("meta", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PromptEstimatorFitError(f"{path}: cannot read the probe's bin edges: {e}") from e


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def counted_down_mae(first: np.ndarray, lengths: np.ndarray, max_tokens: int) -> float:
    """The probe eval's per-token prompt-only MAE: the first estimate counted down one per token, capped
    at max_tokens - j, against the true remaining n - j, over every (request, j < n)."""
    err, count = 0.0, 0
    for e, n in zip(first, lengths, strict=True):
        j = np.arange(int(n))
        err += float(np.abs(np.clip(e - j, 0, max_tokens - j) - (n - j)).sum())
        count += int(n)
    return err / count


def evaluate(est: PromptLengthEstimator, prompts: list[np.ndarray], lengths: np.ndarray, train_mean: float,
             max_tokens: int = MAX_NEW_TOKENS) -> dict[str, float]:
    """Request-level metrics of the estimator on held-out (prompt, answer length) pairs."""
    lengths = np.asarray(lengths, np.float64)
    median = np.array([est.estimate(p) for p in prompts])
    mids = (np.asarray(est.bin_edges[:-1]) + np.asarray(est.bin_edges[1:])) / 2
    # what the engine's TrailPredictor makes of `probs`: the posterior mean over bin midpoints
    posterior_mean = np.minimum(np.array([est.probs(p) @ mids for p in prompts]), max_tokens)
    mean_pred = min(train_mean, max_tokens)
    return {"requests": len(lengths), "spearman": spearman(median, lengths),
            "mae_estimate": float(np.mean(np.abs(np.minimum(median, max_tokens) - lengths))),
            "mae_posterior_mean": float(np.mean(np.abs(posterior_mean - lengths))),
            "mae_mean_predictor": float(np.mean(np.abs(mean_pred - lengths))),
            "prompt_only_mae_counted_down": counted_down_mae(posterior_mean, lengths, max_tokens),
            "mean_prompt_only_mae_counted_down": counted_down_mae(np.full(len(lengths), mean_pred), lengths,
                                                                 max_tokens)}


def _split(rs: ReplaySet, name: str) -> tuple[list[np.ndarray], np.ndarray]:
    sub = rs.subset(name)
    if not len(sub):
        raise PromptEstimatorFitError(f"the replay set has no {name!r} requests")
    return sub.prompts, np.minimum(sub.answer_lengths(), MAX_NEW_TOKENS)


def fit_and_measure(replay: ReplaySet, probe_dir: str | Path, dims: int = 4096,
                    seed: int = 0) -> tuple[PromptLengthEstimator, dict[str, Any]]:
    """Fit on "train", measure on "tune"; the results document's body (no command/date/commit)."""
    edges, probe_meta = probe_bins(probe_dir)
    train_p, train_y = _split(replay, "train")
    tune_p, tune_y = _split(replay, "tune")
    t0 = time.perf_counter()
    est = PromptLengthEstimator.fit(train_p, train_y, edges, dims=dims, seed=seed)
    fit_s = time.perf_counter() - t0
    train_mean = float(train_y.mean())
    # the probe was scored on the first `eval_requests` of "tune" (file order: its --eval-limit)
    n_probe = int((probe_meta.get("tune_metrics") or {}).get("eval_requests", len(tune_y)))
    tune = evaluate(est, tune_p[:n_probe], tune_y[:n_probe], train_mean)
    probe_tune = probe_meta.get("tune_metrics") or {}
    return est, {
        "estimator": {"dims": est.dims, "l2": est.l2, "sigma": est.sigma, "bins": probe_meta.get("bins"),
                      "bin_edges": list(edges), "train_requests": len(train_y), "fit_s": fit_s},
        "tune_metrics": tune,
        "tune_all_metrics": evaluate(est, tune_p, tune_y, train_mean),
        "probe_tune_metrics": {k: probe_tune[k] for k in PROBE_METRIC_KEYS if k in probe_tune},
        "notes": ("split 'tune' only (bench and ood unseen): tune_metrics on the first requests of "
                  "'tune', those the probe was scored on; tune_all_metrics on all of them. mae_estimate: "
                  "the log-normal median; mae_posterior_mean: what TrailPredictor.on_prefill makes of "
                  "probs (the engine's view), comparable to the probe's prefill_mae; *_counted_down: the "
                  "probe eval's per-token prompt-only MAE, comparable to its prompt_only_mae. "
                  "probe_tune_metrics: the replay probe's probe.json meta tune_metrics (its 'metrics' "
                  "are on bench)."),
    }
