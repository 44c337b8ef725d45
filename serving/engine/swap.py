"""Swap preemption: copy a sequence's KV pages to host memory and back.

Page lists are padded to a power-of-two bucket (pads point at the null page 0), so the jitted
gather / scatter compile once per bucket, not once per sequence length. Swap-in donates the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ...models.shapes import pow2_bucket
from .block_manager import NULL_PAGE


@dataclass
class SwappedKV:
    """Host copy of one sequence's pages: [n_layers, 2 (k/v), Hkv, n_pages, page_size, D]."""

    data: np.ndarray
    num_pages: int

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


TRACE_COUNTS = {"gather": 0, "scatter": 0}  # compilations (module-level jit: shared by engines)


@jax.jit
def _gather(caches, pages):
    TRACE_COUNTS["gather"] += 1
    return jnp.stack([jnp.stack([k[:, pages], v[:, pages]]) for k, v in caches])


@partial(jax.jit, donate_argnums=(0,))
def _scatter(caches, pages, data):
    TRACE_COUNTS["scatter"] += 1
    # Pads target the null page; its content is never read, so the duplicate writes are harmless.
    return [(k.at[:, pages].set(data[i, 0].astype(k.dtype)), v.at[:, pages].set(data[i, 1].astype(v.dtype)))
            for i, (k, v) in enumerate(caches)]


def _padded(pages: list[int]) -> np.ndarray:
    out = np.full((pow2_bucket(len(pages)),), NULL_PAGE, np.int32)
    out[:len(pages)] = pages
    return out


def swap_out(caches, pages: list[int]) -> SwappedKV:
    """Copy `pages` (in block-table order) to host; the caller then frees them."""
    data = np.asarray(jax.device_get(_gather(caches, _padded(pages))))
    return SwappedKV(data[:, :, :, :len(pages)].copy(), len(pages))


def swap_in(caches, pages: list[int], saved: SwappedKV):
    """Write the saved KV into freshly allocated `pages`; returns the new caches (old ones donated)."""
    if len(pages) != saved.num_pages:
        raise ValueError(f"swap-in needs {saved.num_pages} pages, got {len(pages)}")
    padded = _padded(pages)
    data = np.zeros(saved.data.shape[:3] + (len(padded),) + saved.data.shape[4:], saved.data.dtype)
    data[:, :, :, :len(pages)] = saved.data
    return _scatter(caches, padded, data)
