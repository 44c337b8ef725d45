"""`jtrail train-probe`: argparse wiring only (JAX, Optax and the model load inside the handler, so
`jtrail --help` stays fast). The work is in `jtrail.probe.pipeline` and `jtrail.probe.train`.

Examples:
    jtrail train-probe --num-prompts 2000 --max-new-tokens 512 --layers 6,11,16,21 --bins equal:10:512 \
        --features-cache /tmp/feats.npz
    jtrail train-probe --from-features /tmp/feats.npz --bins log:10:2048 --epochs 8   # retrain only
    # Replay mode: teacher-force the recorded answers of a replay set (python -m jtrail.replay); train on
    # "train", choose layer and bins on "tune", report on "bench" and "ood"; --out only when given.
    jtrail train-probe --replay /work/replay/replay_all.npz --bins equal:10:1024 log:10:1024 \
        --out jtrail/assets/probe_replay
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path


def _int_tuple(text: str) -> tuple[int, ...]:
    from jtrail.probe.train import ProbeTrainingError

    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ProbeTrainingError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise ProbeTrainingError("no layers given")
    return vals


def _command(args: argparse.Namespace) -> str:
    """The full command line, every option spelled out (recorded in probe.json and the probe's meta)."""
    parts = ["jtrail", "train-probe"]
    skip = {"func", "command", "export_prompts", "workdir", "allow_degenerate"}
    if args.replay is not None:  # options of natural generation only
        skip |= {"dataset", "gen_batch", "chat", "val_fraction"}
    for key, val in sorted(vars(args).items()):
        if key in skip or val is None or val is False:
            continue
        flag = "--" + key.replace("_", "-")
        if val is True:
            parts.append(flag if key != "chat" else "--chat")
        elif isinstance(val, list):
            parts += [flag, *(shlex.quote(str(v)) for v in val)]
        else:
            parts += [flag, shlex.quote(str(val))]
    if not args.chat and args.replay is None:
        parts.append("--no-chat")
    return " ".join(parts)


def default_workdir() -> Path:
    """A fresh scratch directory (created on first write) for the outputs not given explicitly."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"jtrail-train-probe-{stamp}-{os.getpid()}"


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Mode-dependent defaults. Outputs not given go to a scratch --workdir: a default never replaces
    the shipped probes (jtrail/assets/) or the recorded results (benchmarks/results/); those are
    written only when named. Replay mode writes no probe unless --out is given."""
    replay = args.replay is not None
    work = Path(args.workdir) if args.workdir else default_workdir()
    args.workdir = str(work)
    if args.out is None and not replay:
        args.out = str(work / "probe")
    if args.results is None:
        args.results = str(work / ("probe_replay.json" if replay else "probe.json"))
    if args.plot is None:
        args.plot = str(work / f"probe{'_replay' if replay else ''}_mae.png")
    if args.max_new_tokens is None:
        args.max_new_tokens = 1024 if replay else 512
    if args.num_prompts is None:
        args.num_prompts = 5000 if replay else 2000
    if args.bins is None:
        args.bins = ["equal:10:1024", "log:10:1024"] if replay else ["equal:10:512"]


def _check_inputs(args: argparse.Namespace) -> None:
    """Files and sizes, checked before any model loads or any answer is generated."""
    from jtrail.datasets import DatasetError, prompt_texts
    from jtrail.probe.checks import ProbeInputError, check_sizes, check_split

    if args.from_features is not None:
        if not Path(args.from_features).is_file():
            raise ProbeInputError(f"--from-features {args.from_features!r}: no such file")
        return  # no model, no generation: the cached features are checked when loaded
    if args.replay is not None and not (args.features_cache and Path(args.features_cache).is_file()):
        if not Path(args.replay).is_file():
            raise ProbeInputError(f"--replay {args.replay!r}: no such file")
    check_sizes(args.num_prompts, args.val_fraction, args.max_new_tokens, args.max_prompt_tokens,
                args.gen_batch, args.token_budget)
    if args.replay is None and args.dataset not in ("sharegpt", "mtbench"):
        if not Path(args.dataset).is_file():
            raise ProbeInputError(f"--dataset {args.dataset!r}: no such file (or use sharegpt, mtbench)")
        try:
            n = min(len(prompt_texts(args.dataset)), args.num_prompts)
        except DatasetError as e:
            raise ProbeInputError(f"--dataset {args.dataset!r}: {e}") from None
        check_split(n, args.val_fraction, f"--dataset {args.dataset!r}: unique prompts")


def _run_train_probe(args: argparse.Namespace) -> int:
    _resolve_defaults(args)
    _check_inputs(args)  # everything that can fail before the model loads (and before JAX imports)
    from jtrail.probe.data import FeatureCacheError
    from jtrail.probe.pipeline import DataOptions, run
    from jtrail.probe.train import ProbeTrainingError, TrainOptions, parse_bins

    for spec in args.bins:
        parse_bins(spec)
    if len(args.bins) > 1 and args.replay is None:
        raise ProbeTrainingError("bins: several specs are compared only in replay mode (--replay PATH)")
    opts = TrainOptions(bins=args.bins[0], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        weight_decay=args.weight_decay, val_fraction=args.val_fraction, seed=args.seed,
                        hidden=args.hidden)
    layers = _int_tuple(args.layers) if args.layers else None
    from jtrail.datasets import DatasetError
    from jtrail.models.probe_io import ProbeFileError

    try:
        cache = args.from_features or args.features_cache
        if args.replay is not None:
            from jtrail.probe.replay import ReplayOptions, run_replay

            ropts = ReplayOptions(replay_path=args.replay, model=args.model, num_train=args.num_prompts,
                                  eval_limit=args.eval_limit, max_new_tokens=args.max_new_tokens,
                                  max_prompt_tokens=args.max_prompt_tokens,
                                  layers=layers or ReplayOptions.layers, dtype=args.dtype,
                                  token_budget=args.token_budget)
            doc = run_replay(ropts, opts, tuple(args.bins), args.out, args.results, args.plot, cache,
                             _command(args), progress=not args.quiet,
                             require_cache=args.from_features is not None, train_layers=layers,
                             allow_degenerate=args.allow_degenerate)
        else:
            data = DataOptions(model=args.model, dataset=args.dataset, num_prompts=args.num_prompts,
                               max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                               layers=layers or DataOptions.layers, dtype=args.dtype,
                               gen_batch=args.gen_batch,
                               token_budget=args.token_budget, chat=args.chat)
            if args.export_prompts:
                from jtrail.probe.pipeline import export_prompts

                n = export_prompts(args.dataset, args.export_prompts, args.num_prompts)
                print(f"wrote {n} prompts to {args.export_prompts}")
                return 0
            doc = run(data, opts, args.out, args.results, args.plot, cache, _command(args),
                      progress=not args.quiet, require_cache=args.from_features is not None,
                      train_layers=layers, allow_degenerate=args.allow_degenerate)
    except (DatasetError, ProbeFileError, FeatureCacheError) as e:
        print(f"jtrail train-probe: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    b = doc["bars"]
    print(json.dumps({"bars": b, "ratios": doc["ratios"], "probe_dir": doc.get("probe_dir"),
                      "results": args.results, "plot": args.plot}, indent=2))
    return 0


def add_train_probe(sub: argparse._SubParsersAction) -> None:
    """Register `jtrail train-probe` on an argparse subparsers object."""
    p = sub.add_parser("train-probe",
                       help="train TRAIL's length probe head (generate, collect, train, evaluate)")
    p.add_argument("--model", default=None, help="model spec for load_model (default: embedded SmolLM2)")
    p.add_argument("--dataset", default="sharegpt", help="sharegpt, mtbench or a JSONL file of prompts")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="prompts to generate for (default 2000); with --replay: 'train' requests "
                        "(default 5000)")
    p.add_argument("--replay", default=None, metavar="NPZ",
                   help="teacher-force the recorded answers of this replay set (python -m jtrail.replay) "
                        "instead of generating: train on 'train', choose on 'tune', report 'bench' and 'ood'")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="with --replay: first N requests of each of tune/bench/ood (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer cap (default 512; with --replay 1024: longer recorded answers are cut)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--layers", default=None, help="comma-separated tap layers (default 6,11,16,21; "
                                                  "with a features cache: every cached layer)")
    p.add_argument("--bins", nargs="+", default=None,
                   help="equal:K:MAX | log:K:MAX | edges:0,a,b,... (default equal:10:512); with --replay "
                        "several specs are compared on 'tune' (default: equal:10:1024 log:10:1024)")
    p.add_argument("--workdir", default=None,
                   help="scratch directory for the outputs not given below (default: a fresh "
                        "$TMPDIR/jtrail-train-probe-DATE-PID); shipped probes and recorded results are "
                        "replaced only when named explicitly, e.g. --out jtrail/assets/probe")
    p.add_argument("--out", default=None, help="directory for the best probe (default WORKDIR/probe; "
                                               "with --replay: not saved unless given)")
    p.add_argument("--results", default=None,
                   help="results JSON (default WORKDIR/probe.json, or probe_replay.json)")
    p.add_argument("--plot", default=None,
                   help="MAE plot (default WORKDIR/probe_mae.png, or probe_replay_mae.png)")
    p.add_argument("--allow-degenerate", action="store_true",
                   help="accept a run with no finished answer, equal lengths or MAE 0 (smoke tests only; "
                        "the reasons are recorded in the results)")
    p.add_argument("--features-cache", default=None, help=".npz of features: reused if present, else written")
    p.add_argument("--from-features", default=None, help="train only from this existing .npz (no model)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--gen-batch", type=int, default=128)
    p.add_argument("--token-budget", type=int, default=32768, help="tokens per teacher-forced batch")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--export-prompts", default=None, metavar="PATH",
                   help="only write the first --num-prompts prompts of --dataset to a JSONL file and exit")
    p.set_defaults(func=_run_train_probe)
