"""Routing in the simulator on the replay workload: 8 trail replicas, recorded ShareGPT answer lengths.

    python benchmarks/routing_sim_replay.py                       # held-out seed 11, writes the table
    python benchmarks/routing_sim_replay.py --seeds 1,2,3,4 --out /tmp/tune.json   # the tuning seeds

Lengths: the 'bench' split of the replay set (jtrail.replay.ReplaySet; prompt and recorded answer
lengths, drawn with replacement). Replicas as in the serving benchmark (8 slots, 256 KV pages of 16
tokens, the GPU-fitted step model of simulate.py), trail with its defaults (c = 0 until 472b9be; since
then c = 0.5, at most two preemptions, the KV kept: routing_sim8_replay_keep_defaults.json). Arrivals:
seeded Poisson at --load x the measured capacity.

What each side knows, as in `jtrail serve` + `jtrail route`:
- a replica's requests carry the TRAIL probe's estimates: the prompt-probe estimate of a waiting
  request (trail probes on arrival) and the refined estimate of a running one. The probe is the
  synthetic `ProbeLikePredictor` calibrated (on the 'tune' split) to the measured replay probe's
  errors (benchmarks/results/probe_replay.json 'bench': refined MAE 102 tokens, prompt-only 151,
  mean predictor 170); the calibration's own MAEs are recorded beside the table.
- the router polls replica snapshots every --poll-s (`jtrail route`: 0.05 s), each advanced by its
  own sends in between; token-aware reads each replica's slot forecast computed from those estimates.
  The new request's own length estimate is not known to the router (`jtrail route` has no probe)
  unless --router-sees-estimate (as if the router asked a replica's probe first).

Every router runs on the same trace; the mean and p99 E2E and TTFT of each are written, with the
ratios round-robin / token-aware and least-requests / token-aware, per seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
from jtrail.serving.brain.router import TokenAware
from jtrail.serving.simulation.simulator import Resources
from jtrail.serving.simulation.step_model import StepModel

from jtrail.bench.routing_sim import print_tables, record_bars, replay_lengths, run_seed
from jtrail.bench.sim_workloads import ROUTING_STEP_MODEL
from jtrail.provenance import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
REPLAY = Path("/work/replay/replay_all.npz")
ROUTERS = ("round-robin", "least-requests", "power-of-two", "token-aware")
# Calibrated on the replay set's 'tune' split to the measured probe (probe_replay.json, 'bench'):
# prompt-only MAE 151 and refined MAE 102 tokens -> sigma0 0.72, sigma 0.65 (see `predictor_mae`).
SIGMA0, SIGMA = 0.72, 0.65


def probe_edges() -> tuple[float, ...]:
    return tuple(float(x) for x in json.loads((RESULTS / "probe_replay.json").read_text())["bin_edges"])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replay", default=str(REPLAY))
    p.add_argument("--split", default="bench")
    p.add_argument("--seeds", default="11", help="comma list (tuning was done on 1-4; 11 is held out)")
    p.add_argument("--requests", type=int, default=8_000)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--load", type=float, default=0.9)
    p.add_argument("--policy", default="trail")
    p.add_argument("--poll-s", type=float, default=0.05, help="router snapshot period (`jtrail route`: 0.05)")
    p.add_argument("--router-sees-estimate", action="store_true",
                   help="give the router the new request's prompt-probe estimate (a Predict call)")
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--request-weight", type=float, default=TokenAware.REQUEST_WEIGHT,
                   help="token-aware: steps per outstanding request / mean output (default: tuned on 1-4)")
    p.add_argument("--batch-cost", type=float, default=0.0,
                   help="token-aware: expected-completion score, step model b/a (router.py; 0: off)")
    p.add_argument("--step-model", default=ROUTING_STEP_MODEL)
    p.add_argument("--sigma0", type=float, default=SIGMA0)
    p.add_argument("--sigma", type=float, default=SIGMA)
    p.add_argument("--out", default=str(RESULTS / "routing_sim8_replay.json"))
    p.add_argument("--record-bars", default="",
                   help="also write the first seed's ratios as the *_sim8 bars of this file (routing.json); "
                        "its real-replica run and history are kept under `history`")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    sm = StepModel(*(float(x) for x in a.step_model.split(",")))
    res = Resources(num_slots=a.slots, num_pages=a.pages, page_size=a.page_size)
    prm0, out0 = replay_lengths(Path(a.replay), a.split)
    routers = [r for r in a.routers.split(",") if r]
    if "token-aware" not in routers:
        raise SystemExit("--routers must include token-aware (the reference of the ratios)")
    router_kw = {"token-aware": {"page_size": a.page_size, "expected_tokens": float(out0.mean()),
                                 "request_weight": a.request_weight, "batch_cost": a.batch_cost}}
    seeds = [int(s) for s in a.seeds.split(",")]
    edges = probe_edges()
    runs = [run_seed(s, prm0, out0, a, sm, res, routers, router_kw, edges) for s in seeds]
    args = sys.argv[1:] if argv is None else argv
    doc = {"command": "python benchmarks/routing_sim_replay.py " + " ".join(args),
           "device": "cpu (simulator)",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": git_commit(),
           "config": {k: v for k, v in vars(a).items() if k != "out"},
           "lengths": f"replay set {a.replay} split {a.split!r}: recorded answer lengths "
                      f"(mean {out0.mean():.0f}, p90 {np.percentile(out0, 90):.0f}), prompt lengths "
                      f"(mean {prm0.mean():.0f})",
           "step_model": {"a": sm.a, "b": sm.b, "c": sm.c},
           "probe": {"kind": "ProbeLikePredictor calibrated to probe_replay.json", "sigma0": a.sigma0,
                     "sigma": a.sigma, "measured_target": {"refined_mae": 102.3, "prompt_only_mae": 151.1,
                                                           "mean_predictor_mae": 170.2}},
           "router_kw": router_kw, "runs": runs}
    if len(runs) > 1:
        doc["mean_ratios"] = {k: float(np.mean([r["ratios"][k] for r in runs])) for k in runs[0]["ratios"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))
    if a.record_bars:
        record_bars(Path(a.record_bars), doc, runs[0])
    print_tables(runs, a)
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
