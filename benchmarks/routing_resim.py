"""Routing policies in the simulator on a GPU run's recorded workload (serving_raw.npz from serving.py).

    python benchmarks/routing_resim.py serving_raw.npz [--replicas 2] [--loads 0.9,0.97]

serving.py writes serving_raw.npz outside the source tree (its --raw-dir, default ~/.cache/jtrail/benchmarks).
The file behind the recorded results/routing_resim*.json is kept in git history, not in the tree:
    git show 53712ea:benchmarks/results/serving_raw.npz > serving_raw.npz

Requests are drawn from the recorded trace (its prompt and forced output lengths, its recorded probe
outputs), arrive as a seeded Poisson process at a fraction of the replicas' capacity (from the step
model fitted on the run), and are routed over fcfs replicas by round-robin, least-requests and
token-aware (which sees each replica's slot forecast, filled by the simulator as the engine computes
it). `predict_at_arrival`: False as in the real router (it sees no length estimate when it routes:
token-aware assumes --expected-tokens for the new request), True gives it the probe's prompt estimate.
Prints rr / token-aware and least-requests / token-aware mean E2E per seed and writes
benchmarks/results/routing_resim.json. No model and no GPU needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
from jtrail.serving.simulation.step_model import fit_step_model

from jtrail.bench.routing_sim import resim_rows
from jtrail.bench.serving_sweep import load_raw


def main(argv: list[str] | None = None) -> int:
    from jtrail.models.probe_io import load_probe
    from jtrail.serving.brain.predictor import TrailPredictor

    from jtrail.provenance import git_commit
    from jtrail.shipped import default_probe_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--loads", default="0.9,0.97")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--poll-s", type=float, default=0.0,
                   help="routers see replica snapshots refreshed this often (`jtrail route`: 0.05); 0: fresh")
    p.add_argument("--predictor", default="recorded", choices=["recorded", "oracle"],
                   help="the replicas' length estimates: the recorded probe outputs, or the exact lengths")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "routing_resim.json"))
    a = p.parse_args(argv)
    raw = load_raw(a.raw)
    _, pcfg, _ = load_probe(default_probe_path())
    refiner = TrailPredictor(pcfg.bin_edges, pcfg.midpoints)
    steps = [raw["capacity_steps"], *(r["steps"] for r in raw["runs"].values())]
    sm, fit = fit_step_model(np.concatenate(steps))
    # req/s: each slot of each replica serves a mean answer in that many full-batch decode steps (plus
    # one prefill call); the step priced at a full batch and the mean context (a, b and c, not a alone:
    # a fit on a noisy run can put all of a step's time in b)
    wl = raw["workload"]
    out_len, prompt_len = float(np.mean(wl.output_len)), float(np.mean([len(q) for q in wl.prompts]))
    step = sm.step_time(a.slots, a.slots * (prompt_len + out_len / 2))
    capacity = a.replicas * a.slots / (out_len * step + sm.d)
    rows = resim_rows(raw, refiner, sm, capacity, a)
    args = " ".join(sys.argv[1:] if argv is None else argv)
    out = {"command": f"python benchmarks/routing_resim.py {args}", "device": "cpu (simulator)",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "predictor": a.predictor, "poll_s": a.poll_s, "step_model": fit,
           "capacity_req_s": capacity, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
