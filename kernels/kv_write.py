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
from .layout import qkv_parts


def _kernel(slot_ref, kn_ref, vn_ref, _k_in, _v_in, k_ref, v_ref):
    n = pl.program_id(0)
    num_pages, page_size, _ = k_ref.shape
    slot = slot_ref[n]

    @pl.when((slot >= 0) & (slot < num_pages * page_size))
    def _():
        k_ref[slot // page_size, slot % page_size, :] = kn_ref[...].astype(k_ref.dtype)
        v_ref[slot // page_size, slot % page_size, :] = vn_ref[...].astype(v_ref.dtype)


def _check(k_pages, n_new: int, new_rows: tuple[int, ...], slot_mapping, name: str) -> None:
    hkv, _, _, d = k_pages.shape
    if new_rows != (hkv, d):
        raise ValueError(f"{name} must be [N, {hkv}, {d}], got [N, {', '.join(map(str, new_rows))}]")
    if slot_mapping.shape != (n_new,):
        raise ValueError(f"slot_mapping must be [{n_new}], got {slot_mapping.shape}")


def _write(k_pages, v_pages, slot_mapping, k_src, v_src, k_spec, v_spec, n: int, interpret: bool):
    hkv, num_pages, page_size, d = k_pages.shape
    page_spec = pl.BlockSpec((None, num_pages, page_size, d), lambda i, h: (h, 0, 0, 0))
    return pl.pallas_call(
        _kernel,
        grid=(n, hkv),
        in_specs=[pl.BlockSpec((n,), lambda i, h: (0,)), k_spec, v_spec, page_spec, page_spec],
        out_specs=(page_spec, page_spec),
        out_shape=(jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        name="jtrail_write_kv",
    )(slot_mapping.astype(jnp.int32), k_src, v_src, k_pages, v_pages)


@functools.partial(jax.jit, static_argnames=("backend", "interpret"), donate_argnums=(0, 1))
def write_kv_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, *, backend: str = "gpu",
                    interpret: bool = False):
    """write_kv (see reference.write_kv) on donated page buffers."""
    if k_new.ndim != 3 or k_new.shape != v_new.shape:
        raise ValueError(f"k_new/v_new must be equal [N, Hkv, D], got {k_new.shape}, {v_new.shape}")
    _check(k_pages, k_new.shape[0], k_new.shape[1:], slot_mapping, "k_new/v_new")
    if backend == "tpu":
        return reference.write_kv(k_pages, v_pages, k_new, v_new, slot_mapping)
    n, d = k_new.shape[0], k_new.shape[2]
    if n == 0:
        return k_pages, v_pages
    new_spec = pl.BlockSpec((None, None, d), lambda i, h: (i, h, 0))
    return _write(k_pages, v_pages, slot_mapping, k_new, v_new, new_spec, new_spec, n, interpret)


@functools.partial(jax.jit, static_argnames=("backend", "interpret"), donate_argnums=(0, 1))
def write_kv_from_qkv_pallas(k_pages, v_pages, qkv, slot_mapping, *, backend: str = "gpu",
                             interpret: bool = False):
    """write_kv of k = qkv[:, :, G] and v = qkv[:, :, G + 1] (qkv [N, Hkv, G + 2, D], the fused
    projection's layout): the kernel reads both rows in place, so XLA makes no copy of either."""
    if qkv.ndim != 4 or qkv.shape[2] < 3:
        raise ValueError(f"qkv must be [N, Hkv, G + 2, D], got {qkv.shape}")
    n, _, g2, d = qkv.shape
    _check(k_pages, n, (qkv.shape[1], d), slot_mapping, "qkv's k and v rows")
    if backend == "tpu":
        _, k_new, v_new = qkv_parts(qkv)
        return reference.write_kv(k_pages, v_pages, k_new, v_new, slot_mapping)
    if n == 0:
        return k_pages, v_pages
    k_spec = pl.BlockSpec((None, None, None, d), lambda i, h: (i, h, g2 - 2, 0))
    v_spec = pl.BlockSpec((None, None, None, d), lambda i, h: (i, h, g2 - 1, 0))
    return _write(k_pages, v_pages, slot_mapping, qkv, qkv, k_spec, v_spec, n, interpret)
