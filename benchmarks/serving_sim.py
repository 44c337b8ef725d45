"""Simulator vs engine: fit the step-time model from measured engine steps, replay the same trace.

The engine's TRAIL predictor is wrapped so every probe output it sees is recorded per request and
per generated-token count; the simulator then replays exactly those outputs through the same TRAIL
refinement (`RecordedPredictor`), with the same policy objects and the same slots/page pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jtrail.serving.brain.capacity import pauses
from jtrail.serving.brain.predictor import RecordedPredictor, TrailPredictor
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel


def fit_step_model(steps: np.ndarray) -> tuple[StepModel, dict[str, float]]:
    """Least squares over measured (batch tokens, kv tokens, seconds, prefill calls); returns the
    model and its fit quality (relative error of the summed time, R^2)."""
    s = steps[steps[:, 0] > 0]
    # Pauses (a compile: seconds, not milliseconds) are not part of the steady-state cost; least
    # squares would smear them over every step of their kind.
    stall = pauses(s[:, 2])
    s = s[~stall]
    sm = StepModel.fit(s[:, 0], s[:, 1], s[:, 2], s[:, 3])
    pred = np.array([sm.step_time(b, k, c) for b, k, c in zip(s[:, 0], s[:, 1], s[:, 3], strict=True)])
    ss_res = float(np.sum((s[:, 2] - pred) ** 2))
    ss_tot = float(np.sum((s[:, 2] - s[:, 2].mean()) ** 2)) or 1.0
    info = {"a": sm.a, "b": sm.b, "c": sm.c, "d": sm.d, "steps": float(len(s)),
            "stalls_excluded": float(stall.sum()), "r2": 1.0 - ss_res / ss_tot,
            "total_time_rel_error": float(pred.sum() / s[:, 2].sum() - 1.0)}
    return sm, info


def simulate_policies(wl: Any, specs: dict[str, tuple[str, dict]], sm: StepModel, res: Resources,
                      refiner: TrailPredictor, records: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Run the simulator on the workload for each (label -> (policy, kwargs)); summaries per label."""
    trace = Trace(wl.arrival, np.array([len(p) for p in wl.prompts]), wl.output_len,
                  request_ids=list(wl.request_ids), max_tokens=getattr(wl, "max_tokens", None))
    out = {}
    for label, (name, kw) in specs.items():
        pred = RecordedPredictor(refiner, records)
        aging = bool(kw.get("aging"))
        r = simulate(trace, name, sm, res, predictor=pred, policy_kwargs=dict(kw), predict_at_arrival=False,
                     max_jump_steps=8 if aging else None)
        s = r.summary()
        s["sim_wall_s"] = r.wall_seconds
        out[label] = s
    return out


def sim_errors(sim: dict[str, dict[str, float]], eng: dict[str, dict[str, float]]) -> dict[str, float]:
    """Relative error of the simulator's mean E2E against the engine's, per policy label."""
    return {k: float(sim[k]["mean_e2e"] / eng[k]["mean_e2e"] - 1.0) for k in sim if k in eng}
