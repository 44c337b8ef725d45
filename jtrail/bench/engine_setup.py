"""A loaded model and probe for the in-process serving benchmarks, and fresh warmed engines on it
(`benchmarks/serving.py`, `benchmarks/capacity_check.py`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from jtrail.serving.brain.predictor import RecordingPredictor


@dataclass
class Setup:
    model: Any
    tokenizer: Any
    probe: Any
    refiner: Any  # TrailPredictor
    prompt_estimator: Any  # PromptLengthEstimator beside the probe (trail's arrival_estimate="host"), or None
    eos: tuple[int, ...]
    args: argparse.Namespace
    warm_prompts: list[list[int]] = field(default_factory=list)  # token source for engine warm-ups



def load(args: argparse.Namespace) -> Setup:
    import jax
    import jax.numpy as jnp

    from jtrail.models.loader import load_model
    from jtrail.models.probe_io import load_probe
    from jtrail.serving.brain.predictor import TrailPredictor
    from jtrail.shipped import prompt_estimator_beside, resolve_probe_path

    auto = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype = args.dtype if args.dtype != "auto" else auto
    loaded = load_model(args.model, dtype=jnp.dtype(dtype), progress=False)
    probe_dir = resolve_probe_path(args.probe)
    head, pcfg, _ = load_probe(probe_dir)
    if pcfg.d_model != loaded.cfg.d_model:
        raise SystemExit(f"probe d_model {pcfg.d_model} != model d_model {loaded.cfg.d_model}")
    eos = tuple(dict.fromkeys([*loaded.cfg.eos_ids, *getattr(loaded.tokenizer, "eos_ids", ())]))
    args.dtype_used, args.probe_used = dtype, str(probe_dir)
    refiner = TrailPredictor(pcfg.bin_edges, pcfg.midpoints)
    return Setup(loaded.model, loaded.tokenizer, head, refiner, prompt_estimator_beside(probe_dir), eos, args)


def make_engine(su: Setup, policy: str, kw: dict, predictor: Any = None, slots: int | None = None,
                pages: int | None = None) -> Any:
    """A fresh engine, warmed up: every prefill shape and the decode step have run on it before
    anything is timed (`LLMEngine.warmup`, as `jtrail serve` does). Without
    this a run met multi-second stalls in its first steps and a compile of the largest bucket
    mid-trace (measured: 5 s in one run), and at 95% load a stall's backlog takes the rest of the
    trace to drain."""
    from jtrail.serving.brain.scheduler.registry import make_policy
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine

    a = su.args
    cfg = EngineConfig(num_slots=slots or a.slots, page_size=a.page_size, num_pages=pages or a.pages,
                       max_model_len=a.max_model_len,
                       decode_steps_per_call=a.decode_steps, policy=make_policy(policy, **kw), seed=a.seed,
                       async_scheduling=getattr(a, "async_scheduling", EngineConfig.async_scheduling),
                       preemption_mode=getattr(a, "preemption_mode", EngineConfig.preemption_mode))
    eng = LLMEngine(su.model, su.tokenizer, cfg, probe=su.probe, predictor=predictor or su.refiner,
                    prompt_estimator=su.prompt_estimator)
    # the server's own warm-up: every packed prefill shape the slots can reach and the decode step
    # (a warm-up of one prompt per bucket missed packed shapes: compiles mid-run, seconds each)
    eng.warmup(report=lambda _msg: None)
    if isinstance(predictor, RecordingPredictor):
        predictor.rows.clear()
        predictor.predictions.clear()
    return eng

