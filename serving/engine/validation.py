"""The checks a request passes before it is queued: a request the engine can never serve fails at once
with an InvalidRequestError naming the field, before any slow work and without touching other requests."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..sequence import InvalidRequestError, SamplingParams


def check_request(prompt_ids: list[int], params: SamplingParams, vocab: int, max_model_len: int,
                  blocks: Any) -> None:
    """Raise InvalidRequestError for a request an engine with this vocabulary, context limit and KV
    cache (`blocks`: its BlockManager) can never serve."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("params", "must be a SamplingParams")
    if not prompt_ids:
        raise InvalidRequestError("prompt", "must contain at least one token")
    if any((not isinstance(t, int | np.integer)) or t < 0 or t >= vocab for t in prompt_ids):
        raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab})")
    if any(t >= vocab for t in params.forced_output_ids):
        raise InvalidRequestError("forced_output_ids", f"token ids must be in [0, {vocab})")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequestError("prompt", f"{len(prompt_ids)} tokens leave no room under "
                                  f"max_model_len={max_model_len}")
    if blocks.pages_for(len(prompt_ids) + 1) > blocks.num_usable:
        raise InvalidRequestError("prompt", "longer than the whole KV cache")


def check_oracle_length(oracle_length: Any) -> None:
    """A request's true output length (srpt-oracle's rank, forced-length benchmarks): None or an int >= 0."""
    if oracle_length is not None and (isinstance(oracle_length, bool)
                                      or not isinstance(oracle_length, int) or oracle_length < 0):
        raise InvalidRequestError("oracle_length", f"must be None or an int >= 0, got {oracle_length!r}")


def check_host_estimate(estimator: Any, predictor: Any) -> None:
    """A policy asking for host-side arrival estimates needs an estimator, and a predictor that takes
    its bin probabilities: the same bins as the probe's (a mismatch would fail every add_request)."""
    if estimator is None:
        raise InvalidRequestError("prompt_estimator", "the policy's arrival_estimate='host' needs a "
                                  "PromptLengthEstimator (e.g. the replay probe's prompt_estimator.npz)")
    if predictor is None:
        raise InvalidRequestError("predictor", "arrival_estimate='host' needs a length predictor to take "
                                  "the estimates (a probe and its TrailPredictor)")
    for p in (predictor, getattr(predictor, "inner", None)):  # RecordingPredictor wraps one
        edges = getattr(p, "bin_edges", None)
        if edges is not None and not (len(edges) == len(estimator.bin_edges)
                                      and np.allclose(edges, estimator.bin_edges)):
            raise InvalidRequestError("prompt_estimator", f"its bins {list(estimator.bin_edges)} differ "
                                      f"from the predictor's {list(edges)}")
