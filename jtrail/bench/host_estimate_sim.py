"""trail's arrival estimate in the simulator: probe-only prefills vs the host-side prompt estimator.

    python -m jtrail.replay --out /tmp/replay_all.npz
    python -m jtrail.bench.host_estimate_sim --replay /tmp/replay_all.npz
    # -> benchmarks/results/sim_host_estimate.json

Indicative, not the engine: regimes R1 and R2 (their arrivals at the H200's measured capacity, the step
model fitted on its steps: results/serving.json), prompts and recorded answer lengths of the replay
set's 'tune' split (drawn with replacement; 'bench' stays for the engine benchmark). The probe is the
synthetic ProbeLikePredictor calibrated to the replay probe (sigma0 0.72, sigma 0.65, as
routing_sim_replay.py); the host estimate is the shipped estimator's probs on each real prompt.
Specs: fcfs; trail with probe-only prefills (their device time priced by the step model, as the engine
pays it); trail-host (the estimator's estimate at arrival, free, replaced by the probe's at prefill);
trail-free-probe (the probe's prefill estimate at arrival at no cost: the bound neither reaches).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from jtrail.provenance import git_commit
from jtrail.replay import ReplaySet
from jtrail.serving.brain.predictor import ProbeLikePredictor, RecordedPredictor, TrailPredictor
from jtrail.serving.brain.prompt_estimator import PromptLengthEstimator
from jtrail.serving.simulation.regimes import REGIMES, regime_arrivals
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel
from jtrail.shipped import PROMPT_ESTIMATOR_FILE, named_probe_path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"  # in a checkout
MAX_TOKENS = 1024


def run_trace(regime: str, seed: int, rs: ReplaySet, est: PromptLengthEstimator, serving: dict,
              a: argparse.Namespace) -> dict[str, dict[str, float]]:
    fit = serving["simulator"][regime]["step_model"]
    sm = StepModel(fit["a"], fit["b"], fit["c"], fit["d"])
    arr = regime_arrivals(regime, serving["capacity"][regime]["capacity_req_s"], seed)
    pick = np.random.default_rng(1000 + seed).choice(len(rs), len(arr), replace=True)
    prompts = [rs.prompts[i] for i in pick]
    ids = [f"q{i}" for i in range(len(arr))]
    trace = Trace(arr, np.array([len(p) for p in prompts]), np.clip(rs.answer_lengths()[pick], 1, MAX_TOKENS),
                  request_ids=ids, max_tokens=np.full(len(arr), MAX_TOKENS))
    reg = REGIMES[regime]
    res = Resources(num_slots=reg.num_slots, num_pages=reg.num_pages - 1, page_size=16)
    arrival = RecordedPredictor(TrailPredictor(est.bin_edges),
                                {r: est.probs(p)[None] for r, p in zip(ids, prompts, strict=True)})

    def probe() -> ProbeLikePredictor:
        return ProbeLikePredictor(sigma0=a.sigma0, sigma=a.sigma, refine_every=16, seed=seed,
                                  max_tokens=MAX_TOKENS, edges=est.bin_edges)

    runs = {"fcfs": dict(policy="fcfs", predict_at_arrival=False),
            "trail": dict(policy="trail", predict_at_arrival=False, max_jump_steps=8),
            "trail-host": dict(policy="trail", arrival_predictor=arrival, max_jump_steps=8,
                               policy_kwargs={"arrival_estimate": "host"}),
            "trail-free-probe": dict(policy="trail", predict_at_arrival=True, max_jump_steps=8)}
    return {k: simulate(trace, step_model=sm, resources=res, predictor=probe(), **kw).summary()
            for k, kw in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replay", required=True)
    p.add_argument("--split", default="tune")
    p.add_argument("--regimes", default="R1,R2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sigma0", type=float, default=0.72)
    p.add_argument("--sigma", type=float, default=0.65)
    p.add_argument("--out", default=str(RESULTS / "sim_host_estimate.json"))
    a = p.parse_args(argv)
    rs = ReplaySet.load(a.replay).subset(a.split)
    est = PromptLengthEstimator.load(named_probe_path("replay") / PROMPT_ESTIMATOR_FILE)
    serving = json.loads((RESULTS / "serving.json").read_text())
    table: dict[str, dict] = {}
    for regime in a.regimes.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            s = run_trace(regime, seed, rs, est, serving, a)
            f = s["fcfs"]
            table[f"{regime}/seed{seed}"] = {
                k: {"mean_e2e_s": v["mean_e2e"], "mean_e2e_vs_fcfs": v["mean_e2e"] / f["mean_e2e"],
                    "p99_e2e_vs_fcfs": v["p99_e2e"] / f["p99_e2e"]} for k, v in s.items()}
            row = table[f"{regime}/seed{seed}"]
            print(regime, seed, {k: round(v["mean_e2e_vs_fcfs"], 3) for k, v in row.items()}, flush=True)
    args = sys.argv[1:] if argv is None else argv
    regimes = a.regimes.split(",")
    means = {f"{r}/{k}/{m}": float(np.mean([t[k][m] for key, t in table.items() if key.startswith(r + "/")]))
             for r in regimes for k in ("trail", "trail-host", "trail-free-probe")
             for m in ("mean_e2e_vs_fcfs", "p99_e2e_vs_fcfs")}
    doc = {"command": "python -m jtrail.bench.host_estimate_sim " + " ".join(args),
           "device": "cpu (simulator)",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "config": vars(a), "seed_means": means, "table": table}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(means, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
