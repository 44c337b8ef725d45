"""KV-page write: scatter new tokens' K/V into their page slots, in place.

One program per (token, kv head) stores one [head_dim] row at page slot // page_size, offset
slot % page_size. The page arrays are aliased input->output, so under jit with donated buffers the
write happens in place (no copy of the cache). Slots < 0 (padding) or past the cache are skipped.

GPU: Pallas Triton. TPU: XLA's scatter on the donated buffer (already an in-place dynamic-update
on TPU; a Mosaic version needs manual DMA into HBM and brings nothing for a few rows per token).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import reference


def _kernel(slot_ref, kn_ref, vn_ref, _k_in, _v_in, k_ref, v_ref):
    n = pl.program_id(0)
    num_pages, page_size, _ = k_ref.shape
    slot = slot_ref[n]

    @pl.when((slot >= 0) & (slot < num_pages * page_size))
    def _():
        k_ref[slot // page_size, slot % page_size, :] = kn_ref[...].astype(k_ref.dtype)
        v_ref[slot // page_size, slot % page_size, :] = vn_ref[...].astype(v_ref.dtype)


@functools.partial(jax.jit, static_argnames=("backend", "interpret"), donate_argnums=(0, 1))
def write_kv_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, *, backend: str = "gpu",
                    interpret: bool = False):
    """write_kv (see reference.write_kv) on donated page buffers."""
    hkv, num_pages, page_size, d = k_pages.shape
    if k_new.ndim != 3 or k_new.shape != v_new.shape or k_new.shape[1:] != (hkv, d):
        raise ValueError(f"k_new/v_new must be [N, {hkv}, {d}], got {k_new.shape}, {v_new.shape}")
    if slot_mapping.shape != (k_new.shape[0],):
        raise ValueError(f"slot_mapping must be [{k_new.shape[0]}], got {slot_mapping.shape}")
    if backend == "tpu":
        return reference.write_kv(k_pages, v_pages, k_new, v_new, slot_mapping)
    n = k_new.shape[0]
    if n == 0:
        return k_pages, v_pages
    page_spec = pl.BlockSpec((None, num_pages, page_size, d), lambda i, h: (h, 0, 0, 0))
    new_spec = pl.BlockSpec((None, None, d), lambda i, h: (i, h, 0))
    return pl.pallas_call(
        _kernel,
        grid=(n, hkv),
        in_specs=[pl.BlockSpec((n,), lambda i, h: (0,)), new_spec, new_spec, page_spec, page_spec],
        out_specs=(page_spec, page_spec),
        out_shape=(jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        name="jtrail_write_kv",
    )(slot_mapping.astype(jnp.int32), k_new, v_new, k_pages, v_pages)
