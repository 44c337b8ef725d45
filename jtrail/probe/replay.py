"""`jtrail train-probe --replay PATH`: the length probe trained on RECORDED answers (issue 15).

The model's own greedy answers are replaced by the recorded ones of a replay set (`jtrail.replay`):
one teacher-forced forward over prompt + recorded answer per request gives the probe exactly the
hidden states the engine sees when it replays that answer. Splits come from the replay set, by
conversation: heads are trained on "train", the layer and the bins are chosen on "tune" (lowest
refined MAE), and the chosen probe is reported on "bench" (the held-out conversations the serving
benchmark replays) and on "ood" (AlpacaEval, never trained or tuned on). Several bin specs (e.g.
equal-width and log-spaced over 0-1,024) are compared the same way; `bins_comparison` in the results
gives each spec's best layer and its bench/ood figures.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jtrail.models.probe_io import probe_config_to_dict, save_probe
from jtrail.probe.checks import degenerate_data, raise_if_degenerate
from jtrail.probe.data import FeatureCacheError, ProbeFeatures, collect_features
from jtrail.probe.eval import LayerEval
from jtrail.probe.train import (
    LayerResult,
    ProbeTrainingError,
    TrainOptions,
    evaluate_requests,
    train_and_evaluate,
)
from jtrail.provenance import git_commit
from jtrail.replay import ReplaySet

EVAL_SPLITS = ("tune", "bench", "ood")


@dataclass(frozen=True)
class ReplayOptions:
    replay_path: str | None = None  # replay .npz (not read when the features come from a cache)
    model: str | None = None  # load_model spec; None: the embedded SmolLM2
    num_train: int | None = 5000  # first N "train" requests (None: all)
    eval_limit: int | None = None  # first N requests of each of tune/bench/ood (None: all)
    max_new_tokens: int = 1024  # recorded answers longer than this are cut here (no eos)
    max_prompt_tokens: int = 1024
    layers: tuple[int, ...] = (6, 11, 16, 21)
    dtype: str = "auto"
    token_budget: int = 32768


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def select_requests(rs: ReplaySet, opts: ReplayOptions) -> ReplaySet:
    """The requests to featurize: the first `num_train` of "train", the first `eval_limit` of each
    evaluated split (file order, so the choice is deterministic), prompts within `max_prompt_tokens`."""
    fits = rs.prompt_lengths() <= opts.max_prompt_tokens
    idx: list[int] = []
    for name, cap in (("train", opts.num_train), *((s, opts.eval_limit) for s in EVAL_SPLITS)):
        where = np.flatnonzero((rs.split == name) & fits)
        idx += where[:cap].tolist() if cap is not None else where.tolist()
    return rs.take(idx)


def build_replay_features(opts: ReplayOptions, progress: bool = True, replay: ReplaySet | None = None
                          ) -> tuple[ProbeFeatures, dict[str, Any]]:
    """Load the model and the replay set, teacher-force the recorded answers, collect features."""
    import jax.numpy as jnp

    from jtrail.models.loader import load_model

    if replay is None:
        if opts.replay_path is None:
            raise ProbeTrainingError("replay_path: no replay file given (--replay PATH)")
        replay = ReplaySet.load(opts.replay_path)
    rs = select_requests(replay, opts)
    if not np.any(rs.split == "train") or not np.any(rs.split == "tune"):
        raise ProbeTrainingError("the replay set needs 'train' and 'tune' requests")
    dtype = opts.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    t0 = time.perf_counter()
    loaded = load_model(opts.model, dtype=jnp.dtype(dtype), progress=progress)
    vocab = loaded.cfg.vocab_size
    top = max(int(max(a.max() for a in rs.answers)), int(max(p.max() for p in rs.prompts)))
    if top >= vocab:
        raise ProbeTrainingError(f"replay token id {top} is outside the model's vocabulary ({vocab}): "
                                 "the replay set was built with another tokenizer")
    answers = [a[:opts.max_new_tokens].tolist() for a in rs.answers]
    eos = set(loaded.cfg.eos_ids) | set(getattr(loaded.tokenizer, "eos_ids", ()) or ())
    finished = np.asarray([a[-1] in eos for a in answers], bool)
    t1 = time.perf_counter()
    feats = collect_features(loaded.model, [p.tolist() for p in rs.prompts], answers, finished, opts.layers,
                             opts.max_new_tokens, opts.token_budget, progress)
    feats = dataclasses.replace(feats, request_split=rs.split.copy())
    t2 = time.perf_counter()
    info = {"model": {"spec": opts.model, "source": loaded.source, "name": loaded.cfg.name,
                      "n_layers": loaded.cfg.n_layers, "d_model": loaded.cfg.d_model, "dtype": dtype},
            "timing_s": {"load": t1 - t0, "features": t2 - t1},
            "replay": {"path": opts.replay_path,
                       "sha256": _file_sha256(opts.replay_path) if opts.replay_path else None,
                       "requests": {s: int(np.sum(rs.split == s)) for s in ("train", *EVAL_SPLITS)}},
            "teacher_forced_tokens": int(sum(len(a) for a in answers)), "replay_options": asdict(opts)}
    return feats, info


@dataclass
class Choice:
    bins: str
    layer: int
    result: LayerResult
    evals: dict[str, LayerEval]  # "bench", "ood" (where present)


def _bars(metrics: dict[str, float]) -> dict[str, float]:
    return {"refined_mae": metrics["refined_mae"], "prompt_only_mae": metrics["prompt_only_mae"],
            "mean_predictor_mae": metrics["mean_mae"]}


def train_replay(feats: ProbeFeatures, opts: TrainOptions, bins_specs: tuple[str, ...],
                 layers: tuple[int, ...] | None = None, progress: bool = True
                 ) -> tuple[list[Choice], dict[str, dict[int, LayerResult]], dict[str, Any]]:
    """Per bins spec: heads per layer trained on "train", evaluated on "tune"; each spec's best layer is
    then evaluated on "bench" and "ood". Returns the choices (best first), all tune results, data info."""
    if feats.request_split is None:
        raise FeatureCacheError("these features have no replay splits (built without --replay)")
    split = np.asarray(feats.request_split)
    train_req, tune_req = np.flatnonzero(split == "train"), np.flatnonzero(split == "tune")
    if len(train_req) == 0 or len(tune_req) == 0:
        raise ProbeTrainingError("the features need 'train' and 'tune' requests")
    mean_len = float(feats.output_lengths[train_req].mean())
    per_bins: dict[str, dict[int, LayerResult]] = {}
    choices = []
    data: dict[str, Any] = {}
    for spec in bins_specs:
        results, data = train_and_evaluate(feats, dataclasses.replace(opts, bins=spec), layers, progress,
                                           split=(train_req, tune_req))
        per_bins[spec] = results
        best = min(results, key=lambda k: results[k].eval.metrics["refined_mae"])
        evals = {name: evaluate_requests(results[best].head, feats, np.flatnonzero(split == name), mean_len)
                 for name in ("bench", "ood") if np.any(split == name)}
        choices.append(Choice(spec, best, results[best], evals))
    choices.sort(key=lambda c: c.result.eval.metrics["refined_mae"])  # chosen on tune, never on bench
    data = dict(data)
    data["tune_requests"] = data.pop("val_requests")  # the validation split here is "tune"
    data["tune_token_samples"] = data.pop("val_token_samples")
    data["splits"] = {s: int(np.sum(split == s)) for s in ("train", *EVAL_SPLITS)}
    return choices, per_bins, data


def write_replay_outputs(choices: list[Choice], per_bins: dict[str, dict[int, LayerResult]],
                         data: dict[str, Any], info: dict[str, Any], opts: TrainOptions,
                         out_dir: str | Path | None, results_path: str | Path | None,
                         plot_path: str | Path | None, command: str) -> dict[str, Any]:
    """The chosen probe (only if `out_dir`), the results JSON and the bench MAE plot."""
    from jtrail.probe.pipeline import _device, curves_json, write_results

    best = choices[0]
    bench = best.evals.get("bench")
    if bench is None:
        raise ProbeTrainingError("the features have no 'bench' requests to report on")
    bars: dict[str, Any] = {**_bars(bench.metrics), "layer": best.layer}
    if "ood" in best.evals:
        bars.update({f"ood_{k}": v for k, v in _bars(best.evals["ood"].metrics).items()})
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    m = bench.metrics
    doc: dict[str, Any] = {
        "command": command, "device": _device(), "date": date, "git_commit": git_commit(),
        "mode": "replay: teacher-forced recorded answers; layer and bins chosen on 'tune', reported on "
                "'bench' (held-out conversations) and 'ood' (AlpacaEval, GPT-4 answers)",
        "bins": best.bins, "bin_edges": list(probe_config_to_dict(best.result.head.cfg)["bin_edges"]),
        "refinement": "TRAIL Bayesian refinement every token (jtrail.serving.brain.predictor.TrailPredictor; "
                      "per-bin width for non-equal bins)",
        "train_options": asdict(dataclasses.replace(opts, bins=best.bins)), "data": data, "info": info,
        "bars": bars,
        "ratios": {"refined_over_prompt_only": m["refined_mae"] / max(m["prompt_only_mae"], 1e-9),
                   "refined_over_mean_predictor": m["refined_mae"] / max(m["mean_mae"], 1e-9)},
        "bins_comparison": [{"bins": c.bins, "layer": c.layer,
                             "tune": _bars(c.result.eval.metrics),
                             **{name: _bars(ev.metrics) for name, ev in c.evals.items()}} for c in choices],
        "table": [{"bins": spec, "layer": layer, "final_train_loss": r.final_loss,
                   **{f"tune_{k}": v for k, v in r.eval.metrics.items()}}
                  for spec, results in per_bins.items() for layer, r in sorted(results.items())],
        "metrics": {name: ev.metrics for name, ev in best.evals.items()},
        "curves": {name: curves_json(ev) for name, ev in best.evals.items()}}
    if out_dir is not None:
        save_probe(out_dir, best.result.head,
                   {"model": info.get("model"), "layer": best.layer, "bins": best.bins, "data": data,
                    "metrics": m, "ood_metrics": best.evals["ood"].metrics if "ood" in best.evals else None,
                    "tune_metrics": best.result.eval.metrics, "replay": info.get("replay"),
                    "train_options": doc["train_options"], "command": command, "date": date,
                    "git_commit": doc["git_commit"], "device": doc["device"]})
        doc["probe_dir"] = str(out_dir)
    name = (info.get("model") or {}).get("name", "model")
    write_results(doc, results_path, plot_path, {best.layer: bench}, best.layer,
                  f"{name}: replayed answers, bench split MAE (bins {best.bins})")
    return doc


def run_replay(ropts: ReplayOptions, opts: TrainOptions, bins_specs: tuple[str, ...],
               out_dir: str | Path | None, results_path: str | Path | None, plot_path: str | Path | None,
               features_cache: str | Path | None, command: str, progress: bool = True,
               require_cache: bool = False, train_layers: tuple[int, ...] | None = None,
               replay: ReplaySet | None = None, allow_degenerate: bool = False) -> dict[str, Any]:
    """The whole replay pipeline; with an existing `features_cache` the model is never loaded. Replayed
    answers that all hit the cap, or all have one length, raise DegenerateProbeRunError (unless
    `allow_degenerate`)."""
    cache = Path(features_cache) if features_cache is not None else None
    if cache is not None and (cache.is_file() or require_cache):
        feats = ProbeFeatures.load(cache)
        info: dict[str, Any] = {"features_cache": str(cache)}
        if cache.with_suffix(".json").is_file():
            info.update(json.loads(cache.with_suffix(".json").read_text()))
    else:
        feats, info = build_replay_features(ropts, progress, replay)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            feats.save(cache)
            cache.with_suffix(".json").write_text(json.dumps(info, indent=2))
    reasons = degenerate_data(feats.output_lengths, feats.finished, feats.max_new_tokens)
    raise_if_degenerate(reasons, allow_degenerate)
    if reasons:
        info["degenerate"] = reasons
    t0 = time.perf_counter()
    choices, per_bins, data = train_replay(feats, opts, bins_specs, train_layers, progress)
    info = {**info, "train_eval_s": time.perf_counter() - t0}
    return write_replay_outputs(choices, per_bins, data, info, opts, out_dir, results_path, plot_path,
                                command)
