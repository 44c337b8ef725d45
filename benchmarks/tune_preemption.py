"""Tune trail's preemption rule on the simulator, in the regimes of issue 15 (`simulation/regimes.py`).

    .venv/bin/python benchmarks/tune_preemption.py [--seeds 1,2] [--quick | --smoke]

Workload: ShareGPT prompts of at most 1,024 tokens with their recorded first answers' lengths
(capped at 1,024: mean ~291), sent with max_tokens 1,024 (policies do not learn the true length from
the cap). Step model: the newest H200 SmolLM2 engine fit (`preemption_tuning.STEP_MODEL`). Predictor: a
synthetic probe (`ProbeLikePredictor`, 16 equal bins over 0-1,024) whose refined MAE is ~0.4x its
prompt-only MAE (measured and recorded). Capacity per regime: serving/brain/capacity.py on a saturated fcfs
run (2,000 requests at t=0) on the regime's resources. Every policy runs the same trace per seed.

Grid for trail: c in {0, 0.5, 0.8} x cost rule off/on x max_preemptions in {None, 1, 2} at aging 0,
then, on the best two, aging in {25, 50, 100, 200} tokens/s. Choice: the most bars met (issue 15's,
evaluated on the simulator, the preemption bars included, the oracle bars left out), then the
largest geometric mean of fcfs/trail mean E2E over the regimes. (Memory-aware admission with
watermark 0.01 and pages reserved for the predicted length was tried in a first run: in R3 it
made trail c=0 3x slower than fcfs, mean E2E 9.9 s against 4.7 s: the vague prefill estimates
reserve too much; `--memory` searches that rule and the past-future "peak" rule: results/tune_memory.json.)
Tuning seeds
are not the GPU benchmark's. Writes benchmarks/results/tune_preemption.json. Other searches, each its own
file: --order (tune_order.json), --arrival-costs (tune_arrival.json), --memory (tune_memory.json),
--realistic-grid (tune_realistic.json), --probe-hold (trail's probe_hold_s: tune_probe_hold.json),
--keep-grid (preemption that keeps the KV against recompute: tune_keep.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
from jtrail.serving.brain.predictor import ProbeLikePredictor
from jtrail.serving.simulation.predictor_mae import predictor_mae

from jtrail.bench.preemption_tuning import (
    EDGES,
    MAX_TOKENS,
    PROBE,
    STEP_MODEL,
    bars_met,
    tune,
)
from jtrail.provenance import git_commit

OUT = Path(__file__).resolve().parent / "results" / "tune_preemption.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2", help="tuning seeds (the GPU benchmark's seed is not among them)")
    p.add_argument("--requests", type=int, default=None, help="per regime (default: the regime's own)")
    p.add_argument("--quick", action="store_true", help="one seed, 300 requests: a quick check")
    p.add_argument("--smoke", action="store_true", help="one seed, 30 requests, 200-request capacity runs")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--order", action="store_true", help="search the waiting-queue order instead "
                   "(jtrail.bench.order_tuning; writes results/tune_order.json unless --out)")
    p.add_argument("--arrival-costs", action="store_true", help="trail with and without the probe-only "
                   "prefills' device cost (writes results/tune_arrival.json unless --out)")
    p.add_argument("--memory", action="store_true", help="search trail's memory-aware admission instead "
                   "(jtrail.bench.memory_tuning; writes results/tune_memory.json unless --out)")
    p.add_argument("--heldout", type=int, default=11, help="--memory: the seed the choice is confirmed on")
    p.add_argument("--realistic-grid", action="store_true", help="trail's arrival estimate x preemption x "
                   "aging under the realistic probe (writes results/tune_realistic.json unless --out)")
    p.add_argument("--keep-grid", action="store_true", help="trail's preemption settings under preemption "
                   "that keeps the KV in its pages against recompute (writes results/tune_keep.json unless "
                   "--out)")
    p.add_argument("--probe-hold", action="store_true", help="trail's probe_hold_s under the realistic "
                   "probe, probe-only prefills charged (writes results/tune_probe_hold.json unless --out)")
    a = p.parse_args(argv)
    command = " ".join(["python benchmarks/tune_preemption.py", *(sys.argv[1:] if argv is None else argv)])
    if a.memory:
        from jtrail.bench.memory_tuning import write_memory_results
        write_memory_results([int(s) for s in a.seeds.split(",")], a.requests,
                             a.out if a.out != str(OUT) else str(OUT.with_name("tune_memory.json")), command,
                             a.heldout)
        return 0
    if a.arrival_costs or a.order or a.realistic_grid or a.probe_hold or a.keep_grid:  # order_tuning
        from jtrail.bench.order_tuning import (
            arrival_cost_check,
            keep_grid,
            probe_hold_grid,
            realistic_grid,
            write_order_results,
        )
        run, name = ((arrival_cost_check, "tune_arrival.json") if a.arrival_costs
                     else (keep_grid, "tune_keep.json") if a.keep_grid
                     else (realistic_grid, "tune_realistic.json") if a.realistic_grid
                     else (probe_hold_grid, "tune_probe_hold.json") if a.probe_hold
                     else (write_order_results, "tune_order.json"))
        run([int(s) for s in a.seeds.split(",")], a.requests,
            a.out if a.out != str(OUT) else str(OUT.with_name(name)), command)
        return 0
    seeds = [int(s) for s in a.seeds.split(",")][: 1 if a.quick or a.smoke else None]
    n = 30 if a.smoke else 300 if a.quick else a.requests
    t = tune(seeds, n, saturation_requests=200 if a.smoke else 2000)
    prm, out, per_seed, info, table = t["prm"], t["out"], t["per_seed"], t["info"], t["table"]
    best, best_kw, bars, ratios = t["best"], t["best_kw"], t["bars"], t["ratios"]
    mae = predictor_mae(ProbeLikePredictor(**PROBE, seed=0, edges=EDGES), out, 300, np.random.default_rng(0))
    doc = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "seeds": seeds, "step_model": STEP_MODEL,
        "workload": {"prompts": "ShareGPT first human turns <= 1024 tokens", "answers":
                     "recorded first gpt answers, capped at 1024", "max_tokens_sent": MAX_TOKENS,
                     "mean_prompt": float(prm.mean()), "mean_output": float(out.mean())},
        "predictor": {"kind": "ProbeLikePredictor", **PROBE, "bins": "equal:16:1024", **mae,
                      "refined_over_prompt_only": mae["refined_mae"] / mae["prompt_only_mae"]},
        "regimes": info, "chosen": {"label": best, "trail_kwargs": best_kw},
        "bars_sim": bars, "bars_met_sim": bars_met(bars), "table": table, "ratios": ratios,
        "per_seed": per_seed}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print("chosen:", best, best_kw)
    print(json.dumps({k: round(v, 3) for k, v in bars.items()}, indent=0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
