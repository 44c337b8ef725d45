"""Request lengths, arrivals and capacity of the simulator benchmarks (`benchmarks/simulate.py`,
`routing_sim_replay.py`, `routing.py --lengths sharegpt`): ShareGPT prompt and answer lengths (or a
documented lognormal stand-in), seeded Poisson arrivals, and a replica's capacity measured on the
simulator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

# Replicas as in the serving benchmark: 8 slots, 256 KV pages of 16 tokens (memory matters), the step
# model fitted on the GPU engine (benchmarks/results/serving.json), ShareGPT lengths (prompts of at most
# 1024 tokens, answers capped at 512 like the probe's training), a TRAIL-like length predictor.
ROUTING_STEP_MODEL = "0.004975,0.00017,0"  # a, b, c (s): GPU fit of serving.json's run


def sharegpt_length_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Every ShareGPT conversation's (prompt, first answer) token counts (`jtrail.datasets`), int64.
    Tokenizing them takes 20-40 s, so the counts are kept in ~/.cache/jtrail/sharegpt_lengths.npz
    (`XDG_CACHE_HOME` honoured; delete the file after changing the dataset package)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = root / "jtrail" / "sharegpt_lengths.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["prompt"], z["output"]
    from jtrail import datasets

    p = np.asarray(datasets.sharegpt_prompt_lengths(), np.int64)
    o = np.asarray(datasets.sharegpt_output_lengths(), np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, prompt=p, output=o)
    return p, o


def lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """n (prompt, answer) lengths drawn from ShareGPT, clipped to [1, 2048], or the lognormal stand-in."""
    try:  # real ShareGPT answer lengths, when the datasets module exists
        prm, out = sharegpt_length_arrays()
        idx = rng.integers(0, len(out), n)
        return np.clip(prm[idx], 1, 2048), np.clip(out[idx], 1, 2048), "sharegpt"
    except (ImportError, AttributeError):
        out = np.clip(np.round(rng.lognormal(np.log(180), 1.0, n)), 1, 2048).astype(np.int64)
        prm = np.clip(np.round(rng.lognormal(np.log(120), 0.8, n)), 4, 2048).astype(np.int64)
        return prm, out, "lognormal(median 180, sigma 1.0)"


def poisson(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def capacity_rps(sm: StepModel, res: Resources, prm: np.ndarray, out: np.ndarray, n: int = 5_000) -> float:
    """Measured capacity (requests/s): FCFS on a saturated replica (everything queued at t=0).
    Measured rather than computed: page shortages, preemptions and length-biased contexts cut it."""
    k = min(n, len(out))
    tr = Trace(np.zeros(k), prm[:k], out[:k])
    r = simulate(tr, "fcfs", sm, res)
    # Steady state only: the ramp-up (first 10% of completions) and the drain, where the batch is
    # no longer full, overstate the rate (at "90%" of a makespan-based figure the queue grew unboundedly).
    fin = np.sort(r.e2e)  # arrivals are all at t = 0
    lo, hi = k // 10, k - max(k // 10, res.num_slots)
    return (hi - lo) / (fin[hi] - fin[lo]) if hi > lo and fin[hi] > fin[lo] else k / r.makespan


def routing_lengths(n: int, rng, max_prompt: int = 1024,
                    max_output: int = 512) -> tuple[np.ndarray, np.ndarray, str]:
    """n (prompt, answer) lengths of the routing runs: ShareGPT prompts of at most max_prompt tokens,
    answers capped at max_output (or a lognormal stand-in without the datasets)."""
    try:
        prm, out = sharegpt_length_arrays()
        src = f"sharegpt (prompts <= {max_prompt} tokens, answers capped at {max_output})"
    except (ImportError, AttributeError, OSError):
        out = np.round(rng.lognormal(np.log(180), 1.0, 50_000)).astype(np.int64)
        prm = np.round(rng.lognormal(np.log(60), 1.2, 50_000)).astype(np.int64)
        src = "lognormal stand-in (datasets unavailable)"
    keep = (prm >= 1) & (prm <= max_prompt)
    prm, out = prm[keep], np.clip(out[keep], 1, max_output)
    idx = rng.integers(0, len(out), n)
    return prm[idx], out[idx], src
