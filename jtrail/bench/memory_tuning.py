"""The search for trail's memory-aware admission on the simulator (`benchmarks/tune_preemption.py
--memory`): no guard (trail before), Kossmann's "reserve" rule and the past-future "peak" rule
(scheduler/memory.py) at several scales of the predicted lengths, against fcfs (the regime's own:
vLLM's watermark in R3) and the oracle, in the regimes of issue 15.

The synthetic probe is the rank-matched calibration of `order_tuning` (its prompt-only estimate ranks
answers as the real replay probe does), and every waiting request's first estimate is charged as the
engine pays for it (a probe-only prefill: `predict_at_arrival=False`). The choice is made on the
tuning seeds, then confirmed once on a held-out seed.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jtrail.bench.order_tuning import CALIBRATIONS, order_candidates, realistic_table
from jtrail.bench.preemption_tuning import STEP_MODEL

# the engine's preemption bar (issue 15), with half of it kept as margin for the engine's probe, whose
# estimates are worse than the simulator's rank-matched one in MAE
PREEMPTION_LIMIT = 0.25
RULE = (f"R3 trail preemptions per request <= {PREEMPTION_LIMIT} and p99 E2E no worse than trail "
        "without a guard in every regime (tuning seeds' means); then the largest R3 fcfs/x mean E2E")


def memory_candidates() -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (policy, options). Every trail row has trail's order (c = 0, linear aging 100) and
    differs only in its memory guard (`memory=False`: none)."""
    base = order_candidates()["trail default (linear aging 100)"][1]
    c: dict[str, tuple[str, dict[str, Any]]] = {
        "srpt-oracle": ("srpt-oracle", {"c": 0.0, **base}),
        "trail, no guard": ("trail", {**base, "memory": False}),
    }
    for r in (0.25, 1.0):
        c[f"trail reserve {r:g}"] = ("trail", {**base, "watermark": 0.01, "reserve": r,
                                                "memory_mode": "reserve"})
    for r in (0.1, 0.25, 0.5, 1.0):
        c[f"trail peak {r:g}"] = ("trail", {**base, "watermark": 0.01, "reserve": r, "memory_mode": "peak"})
    c["srpt-oracle peak 1"] = ("srpt-oracle", {"c": 0.0, **base, "watermark": 0.01, "reserve": 1.0,
                                               "memory_mode": "peak"})
    return c


def table_for(seeds: list[int], n: int | None, cands: dict[str, tuple[str, dict[str, Any]]]
              ) -> dict[str, dict[str, dict[str, float]]]:
    """regime -> label -> seed means and ratios to fcfs, every first estimate charged."""
    return realistic_table(seeds, n, {lab: (name, kw, False) for lab, (name, kw) in cands.items()})


def choose(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """RULE over the trail rows (the guard-less row is a candidate too)."""
    none = "trail, no guard"
    ok = [lab for lab in table["R3"] if lab.startswith("trail")
          and table["R3"][lab]["preemptions_per_request"] <= PREEMPTION_LIMIT
          and all(table[r][lab]["p99_e2e"] <= table[r][none]["p99_e2e"] * (1 + 1e-9) for r in table)]
    if not ok:
        return none
    return max(ok, key=lambda lab: table["R3"][lab]["fcfs_over_x_mean_e2e"])


def write_memory_results(seeds: list[int], n: int | None, path: str, command: str,
                         heldout: int = 11) -> dict[str, Any]:
    """Tune on `seeds`, confirm the choice once on `heldout`; JSON to `path`
    (benchmarks/results/tune_memory.json)."""
    from jtrail.provenance import git_commit

    cands = memory_candidates()
    table = table_for(seeds, n, cands)
    best = choose(table)
    print("chosen:", best, cands[best][1], flush=True)
    confirm_labels = ["trail, no guard", best, "srpt-oracle"]
    confirm = table_for([heldout], n, {lab: cands[lab] for lab in dict.fromkeys(confirm_labels)})
    geo = {lab: math.exp(np.mean([math.log(table[r][lab]["fcfs_over_x_mean_e2e"]) for r in table]))
           for lab in table["R3"]}
    doc = {"command": command, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "seeds": seeds, "heldout_seed": heldout,
           "requests_per_regime": n or "each regime's own", "step_model": STEP_MODEL,
           "probe": {"calibration": "rank-matched", "sigma0": CALIBRATIONS["rank-matched"][0],
                     "prior": CALIBRATIONS["rank-matched"][1],
                     "first_estimate": "charged (probe-only prefill)"},
           "rule": RULE, "candidates": {lab: {"policy": p, "options": kw} for lab, (p, kw) in cands.items()},
           "chosen": {"label": best, "policy": cands[best][0], "options": cands[best][1]},
           "geo_mean_fcfs_over_x_mean_e2e": geo, "table": table, "heldout": confirm}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=float) + "\n")
    return doc
