"""Re-run the simulator offline on a GPU run's saved trace (serving_raw.npz from benchmarks/serving.py).

    python benchmarks/serving_resim.py serving_raw.npz [--probe DIR]

serving.py writes serving_raw.npz outside the source tree (its --raw-dir, default ~/.cache/jtrail/benchmarks).
The file behind the recorded results/routing_resim*.json is kept in git history, not in the tree:
    git show 53712ea:benchmarks/results/serving_raw.npz > serving_raw.npz

Fits the step model from the saved engine steps, replays the top-rate trace (same arrivals, prompt and
forced output lengths, recorded probe outputs) through the simulator for fcfs / trail / srpt-oracle,
and prints sim vs engine mean E2E per policy. No model and no GPU needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from jtrail.serving.simulation.sim_vs_engine import sim_errors, simulate_policies
from jtrail.serving.simulation.step_model import fit_step_model

from jtrail.bench.serving_sweep import load_raw


def main(argv: list[str] | None = None) -> int:
    from jtrail.models.probe_io import load_probe
    from jtrail.serving.brain.predictor import TrailPredictor
    from jtrail.serving.simulation.simulator import Resources

    from jtrail.shipped import default_probe_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw")
    p.add_argument("--probe", default=None)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    a = p.parse_args(argv)
    raw = load_raw(a.raw)
    _, pcfg, _ = load_probe(Path(a.probe) if a.probe else default_probe_path())
    refiner = TrailPredictor(pcfg.bin_edges, pcfg.midpoints)
    steps = np.concatenate([raw["capacity_steps"], *(r["steps"] for r in raw["runs"].values())])
    sm, fit = fit_step_model(steps)
    print("step model", {k: round(v, 6) for k, v in fit.items()})
    eng = {}
    for label, r in raw["runs"].items():
        ok = np.isfinite(r["e2e"])
        eng[label] = {"mean_e2e": float(r["e2e"][ok].mean()), "mean_ttft": float(r["ttft"][ok].mean())}
    specs = {"fcfs": ("fcfs", {}), "trail": ("trail", {}), "srpt-oracle": ("srpt-oracle", {})}
    specs.update({lab: (r["name"], {"aging": r["aging"], "aging_form": "linear"})
                  for lab, r in raw["runs"].items() if r["name"] == "trail" and r["aging"] > 0})
    specs = {k: v for k, v in specs.items() if k in eng}
    res = Resources(num_slots=a.slots, num_pages=a.pages, page_size=a.page_size)
    sim = simulate_policies(raw["workload"], specs, sm, res, refiner, raw["records"])
    err = sim_errors(sim, eng)
    print(f"{'policy':>22} {'engine E2E':>10} {'sim E2E':>8} {'error':>7} {'engine TTFT':>11} "
          f"{'sim TTFT':>8}")
    for k in specs:
        print(f"{k:>22} {eng[k]['mean_e2e']:10.3f} {sim[k]['mean_e2e']:8.3f} {err[k]:+7.1%} "
              f"{eng[k]['mean_ttft']:11.3f} {sim[k]['mean_ttft']:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
