"""`gittins`: rank by the Gittins index of the probe's posterior over remaining length R.

G = max over thresholds d (bin edges) of P(R <= d) / E[min(R, d)], with R's mass in bin i at the bin's
representative value m_i (its midpoint): for the threshold at the upper edge e_j of bin j-1,
P(R <= e_j) = Σ_{i<j} p_i and E[min(R, e_j)] = Σ_{i<j} p_i m_i + e_j Σ_{i>=j} p_i.
Highest index runs first; we rank by 1/G (tokens, an "effective remaining size": a point mass at x
gives exactly x), so limited preemption, margin and aging mean what they mean for `trail`.
Between refinements the effective size counts down one per token, like TRAIL's estimate. A sequence
without a posterior (oracle / noisy predictors) ranks by its predicted remaining length.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from ...sequence import InvalidRequestError, Sequence
from .ranked import RankedPolicy

DEFAULT_EDGES = tuple(float(x) for x in np.linspace(0.0, 512.0, 11))


def gittins_index(post: np.ndarray, edges: np.ndarray, mids: np.ndarray) -> float:
    p = np.asarray(post, dtype=np.float64)
    p = p / p.sum()
    cdf = np.cumsum(p)  # cdf[j-1] = P(R <= e_j)
    partial = np.cumsum(p * mids)  # Σ_{i<j} p_i m_i
    e = edges[1:]
    expect = partial + e * (1.0 - cdf)
    expect[-1] = partial[-1]  # last threshold: every bin below, E[min(R, d)] = E[R]
    return float(np.max(cdf / np.maximum(expect, 1e-12)))


class GittinsPolicy(RankedPolicy):
    probe_on_arrival = True
    name = "gittins"

    def __init__(self, *, bin_edges: Seq[float] = DEFAULT_EDGES, midpoints: Seq[float] | None = None,
                 c: float = 0.8, margin: float = 0.0, victim: str = "longest", **kw: Any):
        super().__init__(c=c, margin=margin, victim=victim, **kw)
        self.edges = np.asarray(bin_edges, dtype=np.float64)
        if self.edges.ndim != 1 or len(self.edges) < 2 or np.any(np.diff(self.edges) <= 0):
            raise InvalidRequestError("bin_edges", "need >= 2 strictly increasing edges")
        e = self.edges
        self.mids = np.asarray(midpoints if midpoints is not None else (e[:-1] + e[1:]) / 2, dtype=float)
        # seq -> (posterior object, generated tokens when first seen, 1/G); recomputed when the
        # predictor installs a new posterior (it always assigns a fresh array)
        self._cache: dict[Sequence, tuple[np.ndarray, int, float]] = {}

    def rank(self, seq: Sequence) -> float:
        post = seq.posterior
        if post is None:
            return super().rank(seq)
        hit = self._cache.get(seq)
        if hit is None or hit[0] is not post:
            if len(post) != len(self.mids):
                raise InvalidRequestError("posterior", f"has {len(post)} bins, policy has {len(self.mids)}")
            hit = (post, seq.num_generated, 1.0 / gittins_index(post, self.edges, self.mids))
            self._cache[seq] = hit
        return max(hit[2] - (seq.num_generated - hit[1]), 0.0)

    def on_finish(self, seq: Sequence, now: float) -> None:
        super().on_finish(seq, now)
        self._cache.pop(seq, None)
