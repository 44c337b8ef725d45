"""The replay capacity burst alone (128 requests at t=0, fresh fcfs engine, 32 slots, 2,048 pages): capacity,
full-batch step times and pauses (`capacity.pauses`) in one short run, without the full regime runs.

    python benchmarks/capacity_check.py --replay replay_all.npz --model SmolLM2.gguf [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from jtrail.serving.brain.capacity import pauses
from jtrail.serving.simulation.regimes import REGIMES

from jtrail.bench.engine_setup import load, make_engine
from jtrail.bench.serving_regimes import Pool, measure_capacity
from jtrail.provenance import git_commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replay", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--probe", default="replay", help="probe directory or shipped name (default: replay)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=1024, help="longest prompt and answer (tokens)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args()
    # benchmarks/serving.py's defaults, with 1,024-token prompts and answers (--max-tokens)
    args = argparse.Namespace(model=a.model, probe=a.probe, dtype="auto", page_size=16, decode_steps=1,
                              seed=0, slots=16, pages=384, max_model_len=2 * a.max_tokens + 16)
    su = load(args)
    pool = Pool(a.replay, "bench", args.max_model_len, 0)
    r = REGIMES["R2"]
    make = lambda p, kw, reg, pred=None: make_engine(su, p, kw, pred, slots=r.num_slots, pages=r.num_pages)
    cap = measure_capacity(make, pool, r, r.num_slots, a.requests, a.max_tokens, 120)
    steps = cap.pop("steps")
    cap.update(steps=len(steps), pauses=int(pauses(steps[:, 2]).sum()), max_step_s=float(steps[:, 2].max()))
    print(json.dumps(cap, indent=1))
    if a.out:
        doc = {"command": "python benchmarks/capacity_check.py " + " ".join(sys.argv[1:]),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "git_commit": git_commit(), "result": cap}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
