"""TRAIL's probe head: a small MLP on one layer's hidden state that predicts remaining output length.

`d_model -> hidden -> ReLU -> K bins`; it runs inside the jitted model step. The bins are a choice
(TRAIL: 10 equal-width bins over [0, 512]); `ProbeConfig.bin_edges` holds K+1 edges and the last bin
may be open-ended, in which case its representative value is `last_bin_value`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def equal_bins(k: int = 10, max_len: float = 512.0) -> tuple[float, ...]:
    return tuple(float(x) for x in np.linspace(0.0, max_len, k + 1))


def log_bins(k: int = 10, max_len: float = 2048.0) -> tuple[float, ...]:
    inner = np.geomspace(8.0, max_len, k)
    return (0.0, *(float(x) for x in inner))


@dataclass(frozen=True)
class ProbeConfig:
    d_model: int
    layer: int  # tap: hidden state after this block (0-based)
    bin_edges: tuple[float, ...] = field(default_factory=equal_bins)
    hidden: int = 512
    last_bin_value: float | None = None  # None: midpoint of the last bin

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) - 1

    @property
    def midpoints(self) -> np.ndarray:
        e = np.asarray(self.bin_edges, dtype=np.float64)
        mids = (e[:-1] + e[1:]) / 2
        if self.last_bin_value is not None:
            mids[-1] = self.last_bin_value
        return mids

    def bin_of(self, remaining: np.ndarray) -> np.ndarray:
        """Bin index of each remaining length (lengths past the last edge fall in the last bin)."""
        idx = np.searchsorted(np.asarray(self.bin_edges[1:-1]), np.asarray(remaining), side="right")
        return idx.astype(np.int32)


class ProbeHead(nnx.Module):
    def __init__(self, cfg: ProbeConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.fc1 = nnx.Linear(cfg.d_model, cfg.hidden, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.hidden, cfg.num_bins, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """Hidden states [..., d_model] -> bin logits [..., K] (f32)."""
        return self.fc2(jax.nn.relu(self.fc1(h.astype(jnp.float32))))

    def probs(self, h: jax.Array) -> jax.Array:
        return jax.nn.softmax(self(h), axis=-1)
