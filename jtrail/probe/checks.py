"""`jtrail train-probe` sanity checks: sizes before the model loads (a small data set must not crash in
Optax after minutes of generation), and degenerate data or results after (a run where every answer
hits the cap trains a probe with MAE 0 that predicts nothing: an error, not a result)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jtrail.models.errors import JtrailError

# Deliberately free of JAX/Flax/Optax imports: the checks before the model loads must answer in a second.


class ProbeInputError(JtrailError, ValueError):
    """A train-probe input (size, file) that cannot work; the message names the flag."""


class DegenerateProbeRunError(JtrailError, ValueError):
    """The answers or the metrics carry no length signal; `--allow-degenerate` accepts them (smoke tests)."""


def check_sizes(num_prompts: int, val_fraction: float, max_new_tokens: int, max_prompt_tokens: int,
                gen_batch: int, token_budget: int) -> None:
    """Sizes that can fail only after the model loads and generates: checked first."""
    for flag, val in (("--num-prompts", num_prompts), ("--max-new-tokens", max_new_tokens),
                      ("--max-prompt-tokens", max_prompt_tokens), ("--gen-batch", gen_batch),
                      ("--token-budget", token_budget)):
        if val < 1:
            raise ProbeInputError(f"{flag} {val}: must be >= 1")
    check_split(num_prompts, val_fraction, "--num-prompts")


def check_split(n: int, val_fraction: float, what: str = "prompts") -> None:
    """The random split by request needs >= 1 request on each side (as `split_requests` makes it)."""
    n_val = int(round(n * val_fraction))
    if n < 2 or n_val < 1 or n_val >= n:
        raise ProbeInputError(f"{what} {n}: too few for a train/validation split with --val-fraction "
                                 f"{val_fraction} ({n_val} validation, {n - n_val} training requests)")


def degenerate_data(output_lengths: np.ndarray, finished: np.ndarray, max_new_tokens: int) -> list[str]:
    """Why these answers cannot train a length probe (empty: they can)."""
    reasons = []
    if not np.any(finished):
        reasons.append(f"no answer finished within --max-new-tokens {max_new_tokens} "
                       "(every length is the cap)")
    if len(output_lengths) and float(np.std(output_lengths)) == 0.0:
        reasons.append(f"every answer has the same length ({int(output_lengths[0])}): zero variance")
    return reasons


def degenerate_metrics(metrics: Mapping[str, float]) -> list[str]:
    """Why a held-out evaluation is not a result: an MAE of exactly 0 means nothing was left to predict."""
    return [f"{k} is 0" for k in ("refined_mae", "mean_mae") if k in metrics and metrics[k] == 0.0]


def raise_if_degenerate(reasons: list[str], allow: bool) -> None:
    if reasons and not allow:
        raise DegenerateProbeRunError("degenerate run: " + "; ".join(reasons)
                                      + " (raise --max-new-tokens or use more varied prompts)")
