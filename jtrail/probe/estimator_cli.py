"""`jtrail train-prompt-estimator`: fit the host-side prompt length estimator on a replay set's "train"
split, report it on "tune" (jtrail.probe.prompt_estimator_fit), save it next to the probe it serves with.

    python -m jtrail.replay --out /tmp/replay_all.npz
    jtrail train-prompt-estimator --replay /tmp/replay_all.npz \
        --out jtrail/assets/probe_replay/prompt_estimator.npz \
        --results benchmarks/results/prompt_estimator.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import time
from pathlib import Path


def _command(args: argparse.Namespace) -> str:
    """The command line with every option spelled out (recorded in the results)."""
    parts = ["jtrail", "train-prompt-estimator"]
    for key, val in sorted(vars(args).items()):
        if key not in ("func", "command") and val is not None:
            parts += ["--" + key.replace("_", "-"), shlex.quote(str(val))]
    return " ".join(parts)


def _run(args: argparse.Namespace) -> int:
    from jtrail.probe.prompt_estimator_fit import fit_and_measure
    from jtrail.provenance import git_commit
    from jtrail.replay import ReplaySet
    from jtrail.shipped import resolve_probe_path

    probe_dir = resolve_probe_path(args.probe)
    est, body = fit_and_measure(ReplaySet.load(args.replay), probe_dir, dims=args.dims, seed=args.seed)
    if args.out:
        est.save(args.out)
    doc = {"command": _command(args), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "git_commit": git_commit(),
           "replay": {"path": str(args.replay),
                      "sha256": hashlib.sha256(Path(args.replay).read_bytes()).hexdigest()},
           "probe_dir": str(probe_dir), "out": args.out, **body}
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"estimator": body["estimator"], "tune_metrics": body["tune_metrics"],
                      "probe_tune_metrics": body["probe_tune_metrics"]}, indent=2))
    return 0


def add_train_prompt_estimator(sub: argparse._SubParsersAction) -> None:
    """Register `jtrail train-prompt-estimator` on an argparse subparsers object."""
    p = sub.add_parser("train-prompt-estimator",
                       help="fit the host-side answer-length estimate from prompt ids (trail's "
                            "arrival_estimate='host')")
    p.add_argument("--replay", required=True, metavar="NPZ", help="replay set (python -m jtrail.replay)")
    p.add_argument("--probe", default="replay",
                   help="probe whose bins the estimate uses: a shipped name or a directory (default replay)")
    p.add_argument("--out", default=None, help="estimator .npz to write (default: not saved)")
    p.add_argument("--results", default=None, help="results JSON to write (default: printed only)")
    p.add_argument("--dims", type=int, default=4096, help="hashed token-id buckets")
    p.add_argument("--seed", type=int, default=0, help="the held-out fifth of 'train' that picks l2")
    p.set_defaults(func=_run)
