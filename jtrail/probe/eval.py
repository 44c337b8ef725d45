"""Held-out evaluation of a probe head, the way the scheduler will use it.

For each held-out request with an n-token answer, estimates are made after prefill (j = 0, truth n) and
after each fed-back token j = 1..n-1 (truth n - j):
- refined: TRAIL's Bayesian refinement every token (`jtrail.serving.brain.predictor.TrailPredictor`, the very
  object the engine uses), prefill probe on the prompt-mean state, then one refinement per token;
- raw: the probe's own expectation at each token, no refinement;
- prompt-only: the prefill estimate counted down one per token, floored at 0;
- mean: the mean training answer length, counted down, floored at 0.
Every estimate is capped at max_tokens - j, as the predictor does. MAE is averaged over all (request, j)
points (TRAIL's per-token MAE); top-1 accuracy compares the bin of each estimate with the true bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jtrail.models.probe import ProbeConfig
from jtrail.serving.brain.predictor import TrailPredictor
from jtrail.serving.sequence import SamplingParams, Sequence

ESTIMATORS = ("refined", "raw", "prompt_only", "mean")


@dataclass
class LayerEval:
    metrics: dict[str, float]
    curve_x: np.ndarray  # start of each tokens-generated bucket
    curves: dict[str, np.ndarray]  # estimator -> MAE per bucket (nan where empty)


def _request_estimates(pred: TrailPredictor, q0: np.ndarray, q_tokens: np.ndarray, n: int, max_tokens: int,
                       mean_len: float) -> dict[str, np.ndarray]:
    seq = Sequence("eval", [0], SamplingParams(max_tokens=max_tokens), arrival_time=0.0)
    refined = np.empty(n)
    pred.on_prefill(seq, q0)
    refined[0] = seq.predicted_remaining
    for j in range(1, n):
        seq.output_ids.append(0)
        pred.on_decode(seq, q_tokens[j - 1], 1)
        refined[j] = seq.predicted_remaining
    j = np.arange(n)
    cap = max_tokens - j
    raw = np.concatenate([[q0 @ pred.midpoints], q_tokens[:n - 1] @ pred.midpoints])
    return {"refined": refined, "raw": np.clip(raw, 0, cap),
            "prompt_only": np.clip(refined[0] - j, 0, cap), "mean": np.clip(mean_len - j, 0, cap)}


def evaluate_probs(cfg: ProbeConfig, prompt_probs: np.ndarray, token_probs: np.ndarray,
                   token_request: np.ndarray, token_generated: np.ndarray, output_lengths: np.ndarray,
                   max_tokens: int, mean_len: float, curve_buckets: int = 16) -> LayerEval:
    """prompt_probs [N, K] and output_lengths [N] for the held-out requests; token_* rows refer to them
    by index in [0, N). Returns metrics and MAE-vs-tokens-generated curves."""
    n_req = len(output_lengths)
    if prompt_probs.shape != (n_req, cfg.num_bins):
        raise ValueError(f"prompt_probs shape {prompt_probs.shape} != ({n_req}, {cfg.num_bins})")
    pred = TrailPredictor(cfg.bin_edges, cfg.midpoints)
    order = np.lexsort((token_generated, token_request))
    starts = np.searchsorted(token_request[order], np.arange(n_req + 1))
    est: dict[str, list[np.ndarray]] = {k: [] for k in ESTIMATORS}
    truth, gen, probe_hit = [], [], []
    for r in range(n_req):
        n = int(output_lengths[r])
        rows = order[starts[r]:starts[r + 1]]
        if len(rows) != n - 1 or not np.array_equal(token_generated[rows], np.arange(1, n)):
            raise ValueError(f"request {r}: token samples do not cover tokens 1..{n - 1}")
        q_tok = token_probs[rows]
        for k, v in _request_estimates(pred, prompt_probs[r], q_tok, n, max_tokens, mean_len).items():
            est[k].append(v)
        t = n - np.arange(n)
        truth.append(t)
        gen.append(np.arange(n))
        probe_hit.append(np.argmax(np.vstack([prompt_probs[r][None], q_tok]), axis=1) == cfg.bin_of(t))
    y = np.concatenate(truth).astype(np.float64)
    g = np.concatenate(gen)
    true_bin = cfg.bin_of(y)
    metrics: dict[str, float] = {"eval_points": int(len(y)), "eval_requests": int(n_req)}
    width = max(1, int(np.ceil(max_tokens / curve_buckets)))
    bucket = np.minimum(g // width, curve_buckets - 1)
    counts = np.bincount(bucket, minlength=curve_buckets)
    curves = {}
    for k in ESTIMATORS:
        e = np.concatenate(est[k])
        err = np.abs(e - y)
        metrics[f"{k}_mae"] = float(err.mean())
        metrics[f"{k}_top1_acc"] = float(np.mean(cfg.bin_of(e) == true_bin))
        sums = np.bincount(bucket, weights=err, minlength=curve_buckets)
        curves[k] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    metrics["probe_argmax_top1_acc"] = float(np.concatenate(probe_hit).mean())
    first = np.cumsum([0] + [len(t) for t in truth[:-1]])
    metrics["prefill_mae"] = float(np.mean(np.abs(np.concatenate(est["prompt_only"])[first] - y[first])))
    metrics["mean_prefill_mae"] = float(np.mean(np.abs(np.concatenate(est["mean"])[first] - y[first])))
    return LayerEval(metrics, np.arange(curve_buckets) * width, curves)


def plot_curves(evals: dict[int, LayerEval], best_layer: int, path: str, title: str = "") -> None:
    """MAE vs tokens generated: refined probe per layer, plus prompt-only and mean of the best layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer, ev in sorted(evals.items()):
        ax.plot(ev.curve_x, ev.curves["refined"], marker="o", ms=3,
                lw=2.5 if layer == best_layer else 1.2, label=f"refined probe, layer {layer}")
    best = evals[best_layer]
    ax.plot(best.curve_x, best.curves["prompt_only"], ls="--", color="gray",
            label=f"prompt-only (layer {best_layer})")
    ax.plot(best.curve_x, best.curves["mean"], ls=":", color="black", label="mean-length predictor")
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("MAE of remaining length (tokens)")
    ax.set_title(title or "Held-out remaining-length MAE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
