"""Host-side length predictors: TRAIL's Bayesian refinement of the probe's per-token bin posteriors.

TRAIL rule (exact): bins with midpoints m_i and width s; one generated token moves mass one bin down
with probability p = min(1, 1/s): T[0,0] = 1, T[i,i] = 1 - p, T[i,i-1] = p. The first estimate is the
prefill probe output, post_0 = q_0. A refinement D tokens after the previous one computes
prior = post_prev . T^D and post ∝ prior ⊙ q_new; remaining = Σ post_i m_i, capped at
max_tokens - generated. Between refinements the estimate counts down by one per token.

Non-equal (e.g. log-spaced) bins: each bin i uses its own width s_i and p_i = min(1, 1/s_i), i.e.
mass leaves bin i at the rate a uniform length inside that bin would cross its lower edge.

Every predictor has the engine hooks `on_prefill(seq, probs)` and `on_decode(seq, probs, n_new)`
(probs: numpy [K] for the latest token) and the simulator hooks `sim_prefill(seq)` and
`sim_refine(seq, d)` plus `refine_every` (tokens between refinement events; None: no events).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from typing import Protocol, runtime_checkable

import numpy as np

from .sequence import InvalidRequestError, Sequence


@runtime_checkable
class Predictor(Protocol):
    """What the engine calls: after a request's prefill, and after each decode step that appended
    `n_new` tokens. `probs` is the probe head's bin probabilities for the latest token (numpy [K]).
    A predictor writes `seq.predicted_remaining` (and `initial_prediction`, `posterior`,
    `prediction_epoch`); the policy reads them at the next `schedule`."""

    def on_prefill(self, seq: Sequence, probs: np.ndarray) -> None: ...

    def on_decode(self, seq: Sequence, probs: np.ndarray, n_new: int) -> None: ...


@runtime_checkable
class SimPredictor(Protocol):
    """What the simulator calls: no probe outputs exist there, so the predictor makes its own (from the
    sequence's true length, or recorded outputs). `refine_every`: tokens between refinement events
    (None: the estimate changes only at prefill)."""

    refine_every: int | None

    def sim_prefill(self, seq: Sequence) -> None: ...

    def sim_refine(self, seq: Sequence, d: int) -> None: ...


def _cap(seq: Sequence, remaining: float) -> float:
    return float(min(max(remaining, 0.0), seq.max_remaining))


def transition_matrix(bin_edges: Seq[float]) -> np.ndarray:
    """One-token transition matrix over remaining-length bins (rows: from, columns: to).

    TRAIL's rule assumes equal widths s (p = min(1, 1/s)); for non-equal bins (e.g. log-spaced) each
    bin i uses its own width s_i, p_i = min(1, 1/s_i): the rate at which a length spread uniformly
    over bin i crosses its lower edge. With equal bins this is exactly TRAIL's matrix."""
    e = np.asarray(bin_edges, dtype=np.float64)
    widths = np.diff(e)
    if len(e) < 2 or np.any(widths <= 0):
        raise InvalidRequestError("bin_edges", f"need >= 2 strictly increasing edges, got {list(e)}")
    k = len(widths)
    t = np.zeros((k, k))
    t[0, 0] = 1.0
    for i in range(1, k):
        p = min(1.0, 1.0 / widths[i])
        t[i, i], t[i, i - 1] = 1.0 - p, p
    return t


class TrailPredictor:
    """Refines a sequence's remaining-length estimate from the probe's per-token bin probabilities."""

    def __init__(self, bin_edges: Seq[float], midpoints: Seq[float] | None = None, refine_every: int = 1):
        if refine_every < 1:
            raise InvalidRequestError("refine_every", f"must be >= 1, got {refine_every}")
        self.bin_edges = tuple(float(x) for x in bin_edges)
        self.T = transition_matrix(self.bin_edges)
        e = np.asarray(self.bin_edges)
        self.midpoints = np.asarray(midpoints if midpoints is not None else (e[:-1] + e[1:]) / 2, float)
        if self.midpoints.shape != (len(e) - 1,):
            raise InvalidRequestError("midpoints", f"need {len(e) - 1} values, got {self.midpoints.shape}")
        self.refine_every = refine_every
        self._powers: dict[int, np.ndarray] = {}

    @property
    def num_bins(self) -> int:
        return len(self.midpoints)

    def power(self, d: int) -> np.ndarray:
        """T^d, cached (refinements reuse a handful of distances)."""
        m = self._powers.get(d)
        if m is None:
            m = np.linalg.matrix_power(self.T, d)
            if len(self._powers) < 4096:
                self._powers[d] = m
        return m

    def _check(self, probs: np.ndarray) -> np.ndarray:
        q = np.asarray(probs, dtype=np.float64).reshape(-1)
        # Per-token hot path: two reductions, no temporaries. min() >= 0 is False for NaN, and a finite
        # sum rules out +-inf.
        s = float(q.sum()) if q.shape == (self.num_bins,) else 0.0
        if not (s > 0 and math.isfinite(s) and float(q.min()) >= 0):
            raise InvalidRequestError("probs", f"need {self.num_bins} finite non-negative probabilities")
        return q / s

    def update(self, post_prev: np.ndarray, q_new: np.ndarray, d: int) -> np.ndarray:
        """One Bayesian refinement: normalize(post_prev . T^d ⊙ q_new). Pure function."""
        post = (post_prev @ self.power(d)) * self._check(q_new)
        z = post.sum()
        if z <= 0:  # the probe rules out every bin the prior allows: trust the probe alone
            return self._check(q_new)
        return post / z

    def on_prefill(self, seq: Sequence, probs: np.ndarray) -> None:
        post = self._check(probs)
        self._set(seq, post)
        seq.initial_prediction = seq.predicted_remaining

    def refine(self, seq: Sequence, probs: np.ndarray, d: int) -> None:
        """Refinement `d` tokens after the previous one (or after prefill)."""
        if seq.posterior is None:
            self.on_prefill(seq, probs)
            return
        self._set(seq, self.update(seq.posterior, probs, d))

    def on_decode(self, seq: Sequence, probs: np.ndarray, n_new: int) -> None:
        """Called after the engine appended `n_new` tokens; `probs` is the latest token's output."""
        seq.tokens_since_refinement += n_new
        if seq.posterior is None or seq.tokens_since_refinement >= self.refine_every:
            self.refine(seq, probs, seq.tokens_since_refinement)
        elif seq.predicted_remaining is not None:  # count down between refinements
            raw = seq.predicted_remaining - n_new
            seq.predicted_remaining = _cap(seq, raw)
            if seq.predicted_remaining != raw:  # clamped: not a plain count-down, tell the policies
                seq.prediction_epoch += 1

    def _set(self, seq: Sequence, post: np.ndarray) -> None:
        seq.posterior = post
        seq.predicted_remaining = _cap(seq, float(post @ self.midpoints))
        seq.tokens_since_refinement = 0
        seq.prediction_epoch += 1


class OraclePredictor:
    """Exact remaining length from `Sequence.oracle_remaining_at_start` (srpt-oracle, simulations)."""

    refine_every: int | None = None

    def _exact(self, seq: Sequence) -> float:
        if seq.oracle_remaining is None:
            raise InvalidRequestError("oracle_remaining_at_start", f"unknown for {seq.request_id}")
        return float(seq.oracle_remaining)

    def on_prefill(self, seq: Sequence, probs: np.ndarray | None = None) -> None:
        seq.predicted_remaining = self._exact(seq)
        seq.initial_prediction = float(seq.oracle_remaining_at_start)
        seq.prediction_epoch += 1

    def on_decode(self, seq: Sequence, probs: np.ndarray | None = None, n_new: int = 1) -> None:
        seq.predicted_remaining = self._exact(seq)

    sim_prefill = on_prefill

    def sim_refine(self, seq: Sequence, d: int) -> None:
        self.on_decode(seq)


class NoisyOraclePredictor(OraclePredictor):
    """True remaining length times lognormal noise exp(sigma z), redrawn every `refine_every` tokens.

    A stand-in for an imperfect probe in simulations; deterministic given (seed, request_id, step).
    """

    def __init__(self, sigma: float = 0.5, refine_every: int | None = None, seed: int = 0):
        self.sigma, self.refine_every, self.seed = sigma, refine_every, seed

    def _noisy(self, seq: Sequence) -> float:
        key = (self.seed, zlib.crc32(seq.request_id.encode()), seq.num_generated)  # stable across runs
        rng = np.random.default_rng(key)
        return _cap(seq, self._exact(seq) * float(np.exp(self.sigma * rng.standard_normal())))

    def on_prefill(self, seq: Sequence, probs: np.ndarray | None = None) -> None:
        seq.predicted_remaining = self._noisy(seq)
        seq.initial_prediction = seq.predicted_remaining
        seq.prediction_epoch += 1

    def on_decode(self, seq: Sequence, probs: np.ndarray | None = None, n_new: int = 1) -> None:
        seq.predicted_remaining = self._noisy(seq)
        seq.prediction_epoch += 1

    sim_prefill = on_prefill


class RecordedPredictor:
    """Replays recorded per-token probe outputs through TRAIL refinement (for the simulator).

    `records[request_id]` is an array [n+1, K]: row 0 is the prefill probe output, row t the output
    after t generated tokens (rows past the end reuse the last one).
    """

    def __init__(self, refiner: TrailPredictor, records: Mapping[str, np.ndarray]):
        self.refiner, self.records = refiner, records
        self.refine_every: int | None = refiner.refine_every

    def _row(self, seq: Sequence) -> np.ndarray:
        rec = self.records[seq.request_id]
        return rec[min(seq.num_generated, len(rec) - 1)]

    def sim_prefill(self, seq: Sequence) -> None:
        self.refiner.on_prefill(seq, self._row(seq))

    def sim_refine(self, seq: Sequence, d: int) -> None:
        self.refiner.refine(seq, self._row(seq), d)

    def on_prefill(self, seq: Sequence, probs: np.ndarray | None = None) -> None:
        self.sim_prefill(seq)

    def on_decode(self, seq: Sequence, probs: np.ndarray | None = None, n_new: int = 1) -> None:
        self.refiner.on_decode(seq, self._row(seq), n_new)


class SyntheticProbe(RecordedPredictor):
    """A made-up probe for simulations without recorded outputs: at each refinement the "probe" puts a
    discretized lognormal (width `sigma`) around the true remaining length times exp(sigma z), and
    TRAIL's rule refines it, so policies see real posteriors (Gittins needs them)."""

    def __init__(self, refiner: TrailPredictor, sigma: float = 0.5, seed: int = 0):
        super().__init__(refiner, {})
        self.sigma, self.seed = sigma, seed
        e = np.asarray(refiner.bin_edges)
        self._lo, self._hi = np.maximum(e[:-1], 0.5), e[1:]
        self._hi[-1] = max(self._hi[-1], 1e9)  # the last bin takes everything longer

    def _row(self, seq: Sequence) -> np.ndarray:
        from math import erf, log, sqrt

        key = (self.seed, zlib.crc32(seq.request_id.encode()), seq.num_generated)
        z = np.random.default_rng(key).standard_normal()
        mu = log(max(float(seq.oracle_remaining or 0), 0.5)) + self.sigma * z
        cdf = np.vectorize(lambda x: 0.5 * (1 + erf((log(x) - mu) / (self.sigma * sqrt(2)))))
        q = cdf(self._hi) - cdf(self._lo)
        q[0] += cdf(self._lo[0])
        return q + 1e-6


__all__ = ["NoisyOraclePredictor", "OraclePredictor", "Predictor", "RecordedPredictor", "SimPredictor",
           "SyntheticProbe", "TrailPredictor", "transition_matrix"]
