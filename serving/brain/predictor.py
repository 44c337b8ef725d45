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

from ..sequence import InvalidRequestError, Sequence


@runtime_checkable
class Predictor(Protocol):
    """What the engine calls: after a request's prefill, and after each decode step that appended
    `n_new` tokens. `probs` is the probe head's bin probabilities for the latest token (numpy [K]).
    A predictor writes `seq.predicted_remaining` (and `initial_prediction`, `posterior`,
    `prediction_epoch`); the policy reads them at the next `schedule`. A predictor may also offer
    `on_decode_rows(seqs, probs [n, K], n_new)`, the same for a step's rows at once (TrailPredictor)."""

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


def _count_down(seq: Sequence, n_new: int) -> None:
    """Between refinements the estimate falls one per generated token."""
    if seq.predicted_remaining is None:
        return
    raw = seq.predicted_remaining - n_new
    seq.predicted_remaining = _cap(seq, raw)
    if seq.predicted_remaining != raw:  # clamped: not a plain count-down, tell the policies
        seq.prediction_epoch += 1


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
        else:
            _count_down(seq, n_new)

    def on_decode_rows(self, seqs: Seq[Sequence], probs: np.ndarray, n_new: Seq[int]) -> None:
        """`on_decode` for a step's decode rows at once (probs [n, K]): the refinements that fall due
        run as one matrix product per distance instead of one per row (the engine's per-step host
        time, measured: ~35 us per row and token on CPU, a tenth of an H200 step at 32 rows)."""
        q = np.asarray(probs, dtype=np.float64).reshape(len(seqs), -1)
        due: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            seq.tokens_since_refinement += n_new[i]
            if seq.posterior is None:
                self.on_prefill(seq, q[i])
            elif seq.tokens_since_refinement >= self.refine_every:
                due.setdefault(seq.tokens_since_refinement, []).append(i)
            else:
                _count_down(seq, n_new[i])
        for d, rows in due.items():
            qs = q[rows]
            sums = qs.sum(axis=1)
            if q.shape[1] != self.num_bins or not (np.all(sums > 0) and np.all(np.isfinite(sums))
                                                   and float(qs.min()) >= 0):
                for i in rows:  # the row-wise path names the bad row's problem
                    self.refine(seqs[i], q[i], d)
                continue
            qs = qs / sums[:, None]
            post = np.stack([seqs[i].posterior for i in rows]) @ self.power(d) * qs
            z = post.sum(axis=1)
            post = np.where((z > 0)[:, None], post / np.where(z > 0, z, 1.0)[:, None], qs)
            means = post @ self.midpoints
            for j, i in enumerate(rows):
                self._set(seqs[i], post[j], float(means[j]))

    def _set(self, seq: Sequence, post: np.ndarray, mean: float | None = None) -> None:
        seq.posterior = post
        seq.predicted_remaining = _cap(seq, float(post @ self.midpoints) if mean is None else mean)
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


# The shipped probe's bins (equal:10:512), and a fixed table of normals for ProbeLikePredictor.
PROBE_BINS = tuple(512 * i / 10 for i in range(11))
_Z = np.random.default_rng(12345).standard_normal(1 << 16)


class ProbeLikePredictor(RecordedPredictor):
    """For simulations: a synthetic TRAIL probe whose errors match the measured one
    (benchmarks/results/probe.json: refined MAE 46 tokens, prompt-only 118, mean predictor 123). Like
    `SyntheticProbe`: each probe output is a discretized lognormal around the true remaining length
    times exp(sigma z), refined by TRAIL's rule every `refine_every` tokens, but the prefill output is
    much vaguer (`sigma0`: the prompt says little about the answer's length) than the per-token outputs
    (`sigma`). Normals come from a fixed table indexed by a hash of (seed, request, tokens generated):
    deterministic and cheap. Estimates are capped at `max_tokens` - generated, never at the true length."""

    # `prior` (optional, one weight per bin): the workload's length distribution. The prefill row is
    # then prior x likelihood (normalized): a calibrated estimate, shrunk toward the typical length as
    # a trained probe's is (the H200 replay probe's prompt-only estimates span ~150-410 tokens, 5-95%,
    # for answers of 19-616), instead of a lognormal spread around the truth that overshoots.
    def __init__(self, sigma0: float = 1.7, sigma: float = 0.55, refine_every: int = 16, seed: int = 0,
                 max_tokens: int = 512, edges: tuple[float, ...] = PROBE_BINS,
                 prior: Seq[float] | None = None):
        super().__init__(TrailPredictor(edges, refine_every=refine_every), {})
        self.sigma0, self.sigma, self.seed, self.max_tokens = sigma0, sigma, seed, max_tokens
        if prior is not None:
            pr = np.asarray(prior, float)
            if pr.shape != (len(edges) - 1,) or not (np.all(pr >= 0) and pr.sum() > 0):
                raise ValueError(f"prior: need {len(edges) - 1} weights >= 0, not all 0")
            prior = pr / pr.sum()
        self.prior = prior
        e = np.asarray(edges)
        self._logmid = np.log(np.maximum(0.5 * (e[:-1] + e[1:]), 0.5))
        self._llo = [math.log(x) for x in np.maximum(e[:-1], 0.5)]
        self._lhi = [math.log(x) for x in e[1:-1]] + [math.log(1e9)]  # the last bin takes everything longer

    # The simulator forces lengths with max_tokens = the true length, and TRAIL caps an estimate at
    # max_tokens - generated: the true remaining length would bound every estimate. A client sends the
    # workload's cap (`max_tokens`, the answers' cap) instead, so the estimate is capped at that.
    def _uncap(self, seq: Sequence) -> None:
        mean = float(seq.posterior @ self.refiner.midpoints)
        seq.predicted_remaining = min(max(mean, 0.0), float(max(self.max_tokens - seq.num_generated, 0)))

    def sim_prefill(self, seq: Sequence) -> None:
        super().sim_prefill(seq)
        self._uncap(seq)
        seq.initial_prediction = seq.predicted_remaining

    def sim_refine(self, seq: Sequence, d: int) -> None:
        super().sim_refine(seq, d)
        self._uncap(seq)

    def _row(self, seq: Sequence) -> np.ndarray:
        g = seq.num_generated
        sig = self.sigma0 if g == 0 else self.sigma
        z = _Z[zlib.crc32(f"{self.seed}:{seq.request_id}:{g}".encode()) & 0xFFFF]
        mu = math.log(max(float(seq.oracle_remaining or 0), 0.5)) + sig * z
        k = 1.0 / (sig * math.sqrt(2.0))
        lo = [0.5 * (1.0 + math.erf((x - mu) * k)) for x in self._llo]
        q = np.array([0.5 * (1.0 + math.erf((x - mu) * k)) for x in self._lhi]) - np.array(lo)
        q[0] += lo[0]
        if g == 0 and self.prior is not None:
            # Bayes: prior x the likelihood of the observation (mu) given each bin's middle length
            # (not the bins' lognormal mass: the low bins are wide in log length and would win)
            q = self.prior * np.exp(-0.5 * ((self._logmid - mu) / sig) ** 2)
            return q / q.sum() + 1e-6
        return q + 1e-6


class RecordingPredictor:
    """Engine-side predictor that forwards to TRAIL refinement and records every probe output, so the
    simulator can replay them (`records()` -> `RecordedPredictor`) on the engine's own trace."""

    def __init__(self, inner: TrailPredictor):
        self.inner = inner
        self.refine_every = inner.refine_every
        self.rows: dict[str, dict[int, np.ndarray]] = {}
        # (tokens generated, predicted remaining) after each probe output: the estimates the policy saw
        self.predictions: dict[str, list[tuple[int, float | None]]] = {}

    def on_prefill(self, seq: Sequence, probs: np.ndarray) -> None:
        self.rows.setdefault(seq.request_id, {})[0] = np.array(probs, np.float32)
        self.inner.on_prefill(seq, probs)
        self.predictions.setdefault(seq.request_id, []).append((seq.num_generated, seq.predicted_remaining))

    def on_decode(self, seq: Sequence, probs: np.ndarray, n_new: int) -> None:
        self.rows.setdefault(seq.request_id, {})[seq.num_generated] = np.array(probs, np.float32)
        self.inner.on_decode(seq, probs, n_new)
        self.predictions.setdefault(seq.request_id, []).append((seq.num_generated, seq.predicted_remaining))

    def on_decode_rows(self, seqs: Seq[Sequence], probs: np.ndarray, n_new: Seq[int]) -> None:
        kept = np.array(probs, np.float32)  # one copy per step; the rows below are views of it
        for i, seq in enumerate(seqs):
            self.rows.setdefault(seq.request_id, {})[seq.num_generated] = kept[i]
        self.inner.on_decode_rows(seqs, probs, n_new)
        for seq in seqs:
            seen = self.predictions.setdefault(seq.request_id, [])
            seen.append((seq.num_generated, seq.predicted_remaining))

    def records(self, request_ids: list[str], num_bins: int) -> dict[str, np.ndarray]:
        """[n+1, K] per request: row t = output after t generated tokens, forward-filled; a request
        never seen gets a uniform row (no information)."""
        out = {}
        for rid in request_ids:
            got = self.rows.get(rid)
            if not got:
                out[rid] = np.full((1, num_bins), 1.0 / num_bins)
                continue
            n = max(got) + 1
            arr = np.empty((n, num_bins), np.float64)
            cur = got.get(0, np.full(num_bins, 1.0 / num_bins))
            for t in range(n):
                cur = got.get(t, cur)
                arr[t] = cur
            out[rid] = arr
        return out


__all__ = ["NoisyOraclePredictor", "OraclePredictor", "Predictor", "ProbeLikePredictor", "RecordedPredictor",
           "RecordingPredictor", "SimPredictor", "SyntheticProbe", "TrailPredictor", "transition_matrix"]
