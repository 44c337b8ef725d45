"""Simulator vs engine: replay a measured run's trace through the simulator.

The engine's TRAIL predictor is wrapped (`RecordingPredictor`) so every probe output it sees is
recorded per request and per generated-token count; the simulator then replays exactly those outputs
through the same TRAIL refinement (`RecordedPredictor`), with the same policy objects and the same
slots/page pool, on a step model fitted on the engine's steps (`step_model.fit_step_model`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..brain.predictor import RecordedPredictor, TrailPredictor
from .simulator import Resources, Trace, simulate
from .step_model import StepModel


def simulate_policies(wl: Any, specs: dict[str, tuple[str, dict]], sm: StepModel, res: Resources,
                      refiner: TrailPredictor, records: dict[str, np.ndarray],
                      prompt_estimator: Any = None, finish_lag_steps: int = 0) -> dict[str, dict[str, float]]:
    """Run the simulator on the workload for each (label -> (policy, kwargs)); summaries per label.
    `wl`: anything with `arrival`, `prompts`, `output_len`, `request_ids` (and optionally `max_tokens`),
    as `jtrail.bench.loadgen.Workload`. `prompt_estimator` (a PromptLengthEstimator): the arrival
    estimates of specs with `arrival_estimate="host"`, from the workload's prompts. `finish_lag_steps`:
    the engine's steps in flight (`simulate`)."""
    trace = Trace(wl.arrival, np.array([len(p) for p in wl.prompts]), wl.output_len,
                  request_ids=list(wl.request_ids), max_tokens=getattr(wl, "max_tokens", None))
    out = {}
    for label, (name, kw) in specs.items():
        pred = RecordedPredictor(refiner, records)
        aging = bool(kw.get("aging"))
        # the engine's arrival estimate: a probe-only prefill (device time, modelled by the replica) or
        # the host's prompt estimator (free, at arrival); without the estimator a host spec is
        # approximated by the recorded prefill probe output at arrival (the probe's quality, not its)
        host = kw.get("arrival_estimate") == "host"
        arrival = None
        if host and prompt_estimator is not None:
            rows = {rid: prompt_estimator.probs(p)[None]
                    for rid, p in zip(wl.request_ids, wl.prompts, strict=True)}
            arrival = RecordedPredictor(refiner, rows)
        r = simulate(trace, name, sm, res, predictor=pred, policy_kwargs=dict(kw), predict_at_arrival=host,
                     arrival_predictor=arrival, max_jump_steps=8 if aging else None,
                     finish_lag_steps=finish_lag_steps)
        s = r.summary()
        s["sim_wall_s"] = r.wall_seconds
        out[label] = s
    return out


def sim_errors(sim: dict[str, dict[str, float]], eng: dict[str, dict[str, float]]) -> dict[str, float]:
    """Relative error of the simulator's mean E2E against the engine's, per policy label."""
    return {k: float(sim[k]["mean_e2e"] / eng[k]["mean_e2e"] - 1.0) for k in sim if k in eng}
