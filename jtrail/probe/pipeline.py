"""`jtrail train-probe` end to end: prompts -> greedy answers -> per-layer features -> trained heads ->
held-out evaluation -> the best probe (Orbax + JSON), benchmarks/results/probe.json and the MAE plot.

Features can be cached to an .npz (`features_cache`), so retraining with other bins, epochs or layers
skips the model entirely.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jtrail import datasets
from jtrail.models.probe_io import probe_config_to_dict, save_probe
from jtrail.probe.checks import check_split, degenerate_data, degenerate_metrics, raise_if_degenerate
from jtrail.probe.data import FeatureCacheError, ProbeFeatures, collect_features, generate_greedy
from jtrail.probe.eval import plot_curves
from jtrail.probe.train import LayerResult, TrainOptions, best_layer, train_and_evaluate
from jtrail.provenance import git_commit


@dataclass(frozen=True)
class DataOptions:
    model: str | None = None  # load_model spec; None: the embedded SmolLM2
    dataset: str = "sharegpt"  # "sharegpt", "mtbench" or a JSONL path
    num_prompts: int = 2000
    max_new_tokens: int = 512
    max_prompt_tokens: int = 1024  # longer prompts are skipped (bounds the prefill shapes)
    layers: tuple[int, ...] = (6, 11, 16, 21)
    dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    gen_batch: int = 128
    token_budget: int = 32768  # tokens per teacher-forced batch
    chat: bool = True


def export_prompts(dataset: str, path: str | Path, limit: int, max_chars: int = 6000) -> int:
    """Write the first `limit` unique prompts of at most `max_chars` characters as JSONL ({"prompt"}):
    a small file to carry to a machine that lacks the data set package."""
    texts = [t for t in datasets.prompt_texts(dataset) if len(t) <= max_chars][:limit]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}, ensure_ascii=False) + "\n")
    return len(texts)


def tokenize_prompts(tokenizer: Any, texts: Sequence[str], chat: bool, max_prompt_tokens: int,
                     limit: int | None = None) -> list[list[int]]:
    """Token ids of the first `limit` prompts that fit in `max_prompt_tokens` (chat template applied if
    `chat`); over-long prompts are skipped, which bounds the prefill shapes."""
    out: list[list[int]] = []
    for t in texts:
        if limit is not None and len(out) >= limit:
            break
        text = tokenizer.apply_chat_template([{"role": "user", "content": t}]) if chat else t
        ids = tokenizer.encode(text)
        if 0 < len(ids) <= max_prompt_tokens:
            out.append(ids)
    return out


def build_features(opts: DataOptions, progress: bool = True, prompts: list[list[int]] | None = None,
                   val_fraction: float | None = None) -> tuple[ProbeFeatures, dict[str, Any]]:
    """Load the model, generate greedy answers and collect per-layer features. With `val_fraction`,
    too few usable prompts for the train/validation split fail before generation, not after."""
    import jax.numpy as jnp

    from jtrail.models.loader import load_model

    dtype = opts.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    t0 = time.perf_counter()
    loaded = load_model(opts.model, dtype=jnp.dtype(dtype), progress=progress)
    if prompts is None:
        has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
        texts = datasets.prompt_texts(opts.dataset)
        prompts = tokenize_prompts(loaded.tokenizer, texts, opts.chat and has_template,
                                   opts.max_prompt_tokens, opts.num_prompts)
    if len(prompts) < 2:
        raise ValueError(f"only {len(prompts)} usable prompts (max_prompt_tokens={opts.max_prompt_tokens})")
    if val_fraction is not None:
        check_split(len(prompts), val_fraction, f"usable prompts (<= {opts.max_prompt_tokens} tokens):")
    eos = tuple(dict.fromkeys([*loaded.cfg.eos_ids, *getattr(loaded.tokenizer, "eos_ids", ())]))
    t1 = time.perf_counter()
    answers, finished = generate_greedy(loaded.model, prompts, opts.max_new_tokens, eos, opts.gen_batch,
                                        progress)
    t2 = time.perf_counter()
    feats = collect_features(loaded.model, prompts, answers, finished, opts.layers, opts.max_new_tokens,
                             opts.token_budget, progress)
    t3 = time.perf_counter()
    info = {"model": {"spec": opts.model, "source": loaded.source, "name": loaded.cfg.name,
                      "n_layers": loaded.cfg.n_layers, "d_model": loaded.cfg.d_model, "dtype": dtype},
            "timing_s": {"load": t1 - t0, "generate": t2 - t1, "features": t3 - t2},
            "generated_tokens": int(sum(len(a) for a in answers)), "data_options": asdict(opts)}
    return feats, info


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}: {getattr(d, 'device_kind', str(d))} (jax {jax.__version__})"


def write_outputs(results: dict[int, LayerResult], data: dict[str, Any], info: dict[str, Any],
                  opts: TrainOptions, out_dir: str | Path | None, results_path: str | Path | None,
                  plot_path: str | Path | None, command: str) -> dict[str, Any]:
    """Save the best probe, the results JSON and the plot; returns the results document."""
    best = best_layer(results)
    table = [{"layer": layer, "final_train_loss": r.final_loss, **r.eval.metrics}
             for layer, r in sorted(results.items())]
    m = results[best].eval.metrics
    bars = {"refined_mae": m["refined_mae"], "prompt_only_mae": m["prompt_only_mae"],
            "mean_predictor_mae": m["mean_mae"], "layer": best}
    doc = {"command": command, "device": _device(),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "bins": opts.bins,
           "bin_edges": list(probe_config_to_dict(results[best].head.cfg)["bin_edges"]),
           "refinement": "TRAIL Bayesian refinement every token "
                         "(jtrail.serving.brain.predictor.TrailPredictor)",
           "train_options": asdict(opts), "data": data, "info": info, "table": table, "bars": bars,
           "ratios": {"refined_over_prompt_only": m["refined_mae"] / max(m["prompt_only_mae"], 1e-9),
                      "refined_over_mean_predictor": m["refined_mae"] / max(m["mean_mae"], 1e-9)},
           "curves": {str(layer): curves_json(r.eval) for layer, r in sorted(results.items())}}
    if out_dir is not None:
        save_probe(out_dir, results[best].head,
                   {"model": info.get("model"), "layer": best, "bins": opts.bins, "data": data,
                    "metrics": m, "train_options": asdict(opts), "command": command, "date": doc["date"],
                    "git_commit": doc["git_commit"], "device": doc["device"]})
        doc["probe_dir"] = str(out_dir)
    model_name = (info.get("model") or {}).get("name", "model")
    write_results(doc, results_path, plot_path, {k: r.eval for k, r in results.items()}, best,
                  f"{model_name}: held-out remaining-length MAE (bins {opts.bins})")
    return doc


def curves_json(ev) -> dict:
    """An evaluation's MAE-by-position curves as JSON (NaN -> null)."""
    return {"tokens_generated": ev.curve_x.tolist(),
            **{k: [None if np.isnan(v) else float(v) for v in c] for k, c in ev.curves.items()}}


def write_results(doc: dict, results_path, plot_path, evals: dict, best: int, title: str) -> None:
    """The results JSON and the MAE plot, where their paths are given (shared by both modes)."""
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(json.dumps(doc, indent=2))
    if plot_path is not None:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot_curves(evals, best, str(plot_path), title)


def run(data_opts: DataOptions, train_opts: TrainOptions, out_dir: str | Path | None,
        results_path: str | Path | None, plot_path: str | Path | None, features_cache: str | Path | None,
        command: str, progress: bool = True, require_cache: bool = False,
        prompts: list[list[int]] | None = None, train_layers: tuple[int, ...] | None = None,
        allow_degenerate: bool = False) -> dict[str, Any]:
    """The whole pipeline. With an existing `features_cache` the model is never loaded; `train_layers`
    (default: every collected layer) picks which cached layers to train. A degenerate run (no answer
    finished, equal lengths, MAE 0) raises DegenerateProbeRunError before anything is written (the
    features cache excepted), unless `allow_degenerate`: then the reasons are recorded in the results."""
    cache = Path(features_cache) if features_cache is not None else None
    if cache is not None and (cache.is_file() or require_cache):
        feats = ProbeFeatures.load(cache)
        info: dict[str, Any] = {"features_cache": str(cache)}
        meta_path = cache.with_suffix(".json")
        if meta_path.is_file():  # model/timing info written next to the cache when it was built
            info.update(json.loads(meta_path.read_text()))
    else:
        feats, info = build_features(data_opts, progress, prompts, train_opts.val_fraction)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            feats.save(cache)
            cache.with_suffix(".json").write_text(json.dumps(info, indent=2))
    if feats.request_split is not None:  # a random split would mix bench conversations into training
        raise FeatureCacheError(f"{cache} holds replay features (train/tune/bench splits): pass --replay")
    reasons = degenerate_data(feats.output_lengths, feats.finished, feats.max_new_tokens)
    raise_if_degenerate(reasons, allow_degenerate)
    layers = tuple(train_layers) if train_layers else feats.layers
    t0 = time.perf_counter()
    results, data = train_and_evaluate(feats, train_opts, layers, progress)
    info = {**info, "train_eval_s": time.perf_counter() - t0}
    reasons += degenerate_metrics(results[best_layer(results)].eval.metrics)
    raise_if_degenerate(reasons, allow_degenerate)
    if reasons:
        info["degenerate"] = reasons
    return write_outputs(results, data, info, train_opts, out_dir, results_path, plot_path, command)
