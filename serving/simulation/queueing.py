"""Closed forms of M/G/1 queueing theory, the independent reference for the simulator.

- FCFS, Pollaczek-Khinchine: E[T] = E[S] + λ E[S²] / (2 (1 - ρ)).
- SRPT (Schrage & Miller 1966): for a job of size x, with ρ(x) = λ ∫_0^x t dF(t),
  E[T(x)] = λ (∫_0^x t² dF(t) + x² (1 - F(x))) / (2 (1 - ρ(x))²) + ∫_0^x dt / (1 - ρ(t)),
  and E[T] = ∫ E[T(x)] dF(x). Evaluated exactly for a discrete (e.g. empirical) size distribution:
  ρ(t) is a step function, so the second integral is a finite sum.
"""

from __future__ import annotations

import numpy as np

from ..sequence import InvalidRequestError


def _check(lam: float, rho: float) -> None:
    if lam <= 0 or not rho < 1:
        raise InvalidRequestError("load", f"need arrival rate > 0 and load < 1, got rate {lam}, load {rho}")


def mg1_fcfs_mean_response(lam: float, sizes: np.ndarray, probs: np.ndarray | None = None) -> float:
    s = np.asarray(sizes, dtype=np.float64)
    p = np.full(len(s), 1.0 / len(s)) if probs is None else np.asarray(probs, float) / np.sum(probs)
    es, es2 = float(p @ s), float(p @ s**2)
    _check(lam, lam * es)
    return es + lam * es2 / (2 * (1 - lam * es))


def mg1_srpt_mean_response(lam: float, sizes: np.ndarray, probs: np.ndarray | None = None) -> float:
    s = np.asarray(sizes, dtype=np.float64)
    p = np.full(len(s), 1.0 / len(s)) if probs is None else np.asarray(probs, float) / np.sum(probs)
    x, inv = np.unique(s, return_inverse=True)  # support points, ascending
    px = np.bincount(inv, weights=p)
    _check(lam, lam * float(px @ x))
    cdf = np.cumsum(px)
    rho = lam * np.cumsum(px * x)  # ρ(x_k), including the atom at x_k
    m2 = np.cumsum(px * x**2)
    wait = lam * (m2 + x**2 * (1 - cdf)) / (2 * (1 - rho) ** 2)
    # ∫_0^{x_k} dt / (1 - ρ(t)): on (x_{j-1}, x_j] ρ(t) = ρ(x_{j-1}) (ρ(t) counts sizes < t there)
    rho_before = np.concatenate([[0.0], rho[:-1]])
    widths = np.diff(np.concatenate([[0.0], x]))
    resid = np.cumsum(widths / (1 - rho_before))
    return float(px @ (wait + resid))
