"""A simulated length predictor scored as the probe benchmark scores the real probe: MAE of the
remaining-length estimate along every answer (refined, prompt-only, mean-length), and at prefill."""

from __future__ import annotations

import numpy as np

from ..brain.predictor import ProbeLikePredictor


def predictor_mae(pred: ProbeLikePredictor, out: np.ndarray, n: int, rng) -> dict[str, float]:
    """The probe benchmark's metrics on this predictor: MAE of the remaining-length estimate over every
    generated token (refined; prompt-only = the prefill estimate counted down; mean = the mean length
    counted down), and at prefill only."""
    from jtrail.serving.sequence import SamplingParams, Sequence

    lens, mu, k = rng.choice(out, n), float(out.mean()), pred.refine_every
    err = {"refined": [], "prompt_only": [], "mean": [], "prefill": [], "mean_prefill": []}
    for i, n_out in enumerate(lens):
        s = Sequence(f"mae{i}", [0], SamplingParams(max_tokens=int(n_out), ignore_eos=True), 0.0)
        s.oracle_remaining_at_start = int(n_out)
        pred.sim_prefill(s)
        p0, est = float(s.predicted_remaining), []
        for g in range(n_out):
            if g and g % k == 0:
                pred.sim_refine(s, k)
            est.append(s.predicted_remaining if g % k == 0 else max(est[-1] - 1.0, 0.0))
            s.output_ids.append(0)
        j = np.arange(n_out)
        true = n_out - j
        err["refined"].append(np.abs(np.array(est) - true))
        err["prompt_only"].append(np.abs(np.clip(p0 - j, 0, None) - true))
        err["mean"].append(np.abs(np.clip(mu - j, 0, None) - true))
        err["prefill"].append([abs(p0 - n_out)])
        err["mean_prefill"].append([abs(mu - n_out)])
    return {f"{k}_mae": float(np.concatenate(v).mean()) for k, v in err.items()}
