"""Simulator benchmark: speed, agreement with queueing theory, routing and policy comparisons.

    .venv/bin/python benchmarks/simulate.py            # full run (~ a few minutes on one core)
    .venv/bin/python benchmarks/simulate.py --quick    # smaller sizes (a few minutes)
    .venv/bin/python benchmarks/simulate.py --smoke --out /tmp/s.json   # tiny sizes: a CPU test (seconds)

Writes benchmarks/results/simulate.json. Lengths: real ShareGPT answer lengths when `jtrail.datasets`
provides them, else a documented lognormal stand-in (median 180 tokens, sigma 1.0, clipped to
[1, 2048]; mean ~ 290: heavy-tailed like ShareGPT answers). The step model is a documented default
(`--step-model a,b,c`, seconds) until one fitted on the GPU engine replaces it.

Routing (`--sections routing`, ~2-3 min): 8 replicas like the serving benchmark's (8 slots, 256 pages
of 16 tokens), the GPU-fitted step model (`--routing-step-model`), ShareGPT lengths, a synthetic TRAIL
probe with the measured errors (`ProbeLikePredictor`), 90% of the measured capacity; every router on
the same trace, replicas running fcfs and trail. Token-aware reads each replica's slot forecast
(`forecast.replica_forecast`), which the simulator fills as the engine does. The rule was
designed on seeds 1-4; the default `--routing-seed 11` was not looked at while designing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from jtrail.serving.simulation.step_model import StepModel

from jtrail.bench.sim_sections import (
    bench_aging,
    bench_policies,
    bench_routing,
    bench_speed,
    bench_theory,
    print_routing,
    print_summary,
    section_bars,
    section_sizes,
)
from jtrail.bench.sim_workloads import ROUTING_STEP_MODEL
from jtrail.provenance import git_commit

OUT = Path(__file__).resolve().parent / "results" / "simulate.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU test of the script (seconds)")
    ap.add_argument("--step-model", default="0.008,2e-5,5e-9",
                    help="a,b,c in seconds (default: a documented guess, until a GPU fit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="", help="comma list of speed,theory,routing,policies,aging")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--speed-load", type=float, default=0.5, help="load of the 1M-request speed run")
    ap.add_argument("--routing-requests", type=int, default=20_000, help="fcfs routing trace")
    ap.add_argument("--routing-trail-requests", type=int, default=10_000,
                    help="the trail runs use the first N requests of the same trace")
    ap.add_argument("--routing-policies", default="fcfs,trail", help="engine policies of the replicas")
    ap.add_argument("--routing-seed", type=int, default=11,
                    help="routing trace seed (the rule was designed on seeds 1-4; 11 is held out)")
    ap.add_argument("--routing-step-model", default=ROUTING_STEP_MODEL,
                    help="a,b,c of the routing section (default: the GPU fit of serving.json)")
    ap.add_argument("--policy-requests", type=int, default=100_000)
    ap.add_argument("--aging-requests", type=int, default=50_000)
    args = ap.parse_args()
    sm = StepModel(*(float(x) for x in args.step_model.split(",")))
    rng = np.random.default_rng(args.seed)
    n = section_sizes(args)
    sections = {"speed": lambda: bench_speed(n["speed"], sm, rng, args.speed_load),
                "theory": lambda: bench_theory(n["theory"], rng),
                "routing": lambda: bench_routing(
                    n["routing"], StepModel(*(float(x) for x in args.routing_step_model.split(","))),
                    args.routing_seed, policies=tuple(args.routing_policies.split(",")),
                    trail_requests=n["routing_trail"]),
                "policies": lambda: bench_policies(n["policies"], rng),
                "aging": lambda: bench_aging(n["aging"], rng)}
    wanted = args.sections.split(",") if args.sections else list(sections)
    out_path = Path(args.out)
    # Sections not run now keep their earlier results (sections can run in separate processes).
    earlier = json.loads(out_path.read_text()) if out_path.exists() else {}
    res = {k: v for k, v in earlier.items() if k in sections and k not in wanted}
    for name in wanted:  # one at a time, with progress: the full run takes minutes
        t0 = time.perf_counter()
        res[name] = sections[name]()
        # the top-level command is the latest run's: each section keeps the one that produced it
        res[name]["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        res[name]["section_wall_s"] = time.perf_counter() - t0
        print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
        if name == "routing":
            print_routing(res[name])
    missing = [k for k in sections if k not in res]  # written anyway; run them later with --sections
    commit = git_commit()
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": "cpu (1 core, simulator)",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_commit": commit,
           "step_model": {"a": sm.a, "b": sm.b, "c": sm.c}, **res,
           "missing_sections": missing, "bars": section_bars(res, args.quick or args.smoke)}
    # keys added to the file by hand (notes, earlier commands, kept runs) stay
    doc.update({k: v for k, v in earlier.items() if k not in doc and k not in sections})
    if wanted != list(sections) and isinstance(earlier.get("commands"), dict):
        doc["commands"] = {**earlier["commands"], ", ".join(wanted): doc["command"]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2))
    if missing:
        print(f"not run yet: {missing}; wrote {out_path}")
        return
    print_summary(res)
    print(f"default aging: {res['aging']['default']}  -> {out_path}")


if __name__ == "__main__":
    main()
