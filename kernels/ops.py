"""Dispatchers: the engine calls these; `impl` picks the kernel.

impl:
  "auto"             Pallas on gpu/tpu, the jnp reference on cpu (Pallas needs interpret mode there).
  "pallas"           Pallas, lowered for jax.default_backend() (Triton on gpu, Mosaic on tpu).
  "pallas_interpret" the GPU-style Pallas kernels run in interpret mode (any backend; tests).
  "tpu_interpret"    the TPU (Mosaic) kernels run in Pallas TPU interpret mode (tests on cpu).
  "reference"        plain jnp (kernels/reference.py).
Signatures and layout: see kernels/reference.py.
"""

from __future__ import annotations

import jax

from . import reference
from .layout import qkv_parts

IMPLS = ("auto", "pallas", "pallas_interpret", "tpu_interpret", "reference")


def _resolve(impl: str) -> tuple[str, bool]:
    """-> (backend family "gpu" | "tpu" | "reference", interpret flag)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "reference" or (impl == "auto" and backend not in ("gpu", "tpu")):
        return "reference", False
    if impl == "pallas_interpret":
        return "gpu", True
    if impl == "tpu_interpret":
        return "tpu", True
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"impl='pallas' needs a gpu or tpu backend, got {backend!r}; "
                         "use 'pallas_interpret' on cpu")
    return backend, False


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, *, impl: str = "auto"):
    """Scatter new K/V tokens into their page slots (see reference.write_kv)."""
    fam, interpret = _resolve(impl)
    if fam == "reference":
        return reference.write_kv(k_pages, v_pages, k_new, v_new, slot_mapping)
    from .kv_write import write_kv_pallas

    return write_kv_pallas(k_pages, v_pages, k_new, v_new, slot_mapping,
                           backend=fam, interpret=interpret)


def write_kv_from_qkv(k_pages, v_pages, qkv, slot_mapping, *, impl: str = "auto"):
    """write_kv of the k and v rows of the fused projection's output qkv [N, Hkv, G + 2, D] (k at G,
    v at G + 1), read in place by the GPU kernel."""
    fam, interpret = _resolve(impl)
    if fam == "reference":
        _, k_new, v_new = qkv_parts(qkv)
        return reference.write_kv(k_pages, v_pages, k_new, v_new, slot_mapping)
    from .kv_write import write_kv_from_qkv_pallas

    return write_kv_from_qkv_pallas(k_pages, v_pages, qkv, slot_mapping, backend=fam, interpret=interpret)


def decode_attention_from_qkv(qkv, k_pages, v_pages, lengths, block_tables, *, scale=None, softcap=None,
                              impl: str = "auto", **tuning):
    """decode_attention of the queries in the fused projection's output qkv [B, Hkv, G + 2, D] (the
    first G rows of each kv head) -> [B, Hkv * G, D]; the GPU kernel reads them in place."""
    fam, interpret = _resolve(impl)
    if fam == "gpu":
        from .paged_attention_gpu import decode_attention_from_qkv_pallas

        return decode_attention_from_qkv_pallas(qkv, k_pages, v_pages, lengths, block_tables, scale=scale,
                                                softcap=softcap, interpret=interpret, **tuning)
    return decode_attention(qkv_parts(qkv)[0], k_pages, v_pages, lengths, block_tables, scale=scale,
                            softcap=softcap, impl=impl, **tuning)


def decode_rope_write(qkv, k_pages, v_pages, lengths, block_tables, slot_mapping, rope_rows, *, scale=None,
                      softcap=None, impl: str = "auto", **tuning):
    """A decode step's RoPE, K/V write and attention from the fused projection's raw rows qkv
    [B, Hkv, G + 2, D] (see reference.decode_rope_write) -> (out, k_pages, v_pages). On the GPU one
    kernel does all three (the rotation and the write ride on the attention's loads); elsewhere the
    reference composes them (the engine offers this path on the GPU only: `rope_in_kernel`)."""
    fam, interpret = _resolve(impl)
    if fam == "gpu":
        from .paged_attention_gpu import decode_rope_write_pallas

        return decode_rope_write_pallas(qkv, k_pages, v_pages, lengths, block_tables, slot_mapping, rope_rows,
                                        scale=scale, softcap=softcap, interpret=interpret, **tuning)
    return reference.decode_rope_write(qkv, k_pages, v_pages, lengths, block_tables, slot_mapping, rope_rows,
                                       scale=scale, softcap=softcap)


def family(impl: str) -> str:
    """The kernel family `impl` resolves to here: "gpu" (Triton, or its interpret mode), "tpu" or
    "reference"."""
    return _resolve(impl)[0]


def decode_attention(q, k_pages, v_pages, lengths, block_tables, *, scale=None, softcap=None,
                     impl: str = "auto", **tuning):
    """One query token per sequence over its pages (see reference.decode_attention)."""
    fam, interpret = _resolve(impl)
    if fam == "reference":
        return reference.decode_attention(q, k_pages, v_pages, lengths, block_tables,
                                          scale=scale, softcap=softcap)
    if fam == "tpu":
        from .paged_attention_tpu import decode_attention_tpu

        return decode_attention_tpu(q, k_pages, v_pages, lengths, block_tables, scale=scale,
                                    softcap=softcap, interpret=interpret, **tuning)
    from .paged_attention_gpu import decode_attention_pallas

    return decode_attention_pallas(q, k_pages, v_pages, lengths, block_tables, scale=scale,
                                   softcap=softcap, interpret=interpret, **tuning)


def prefill_attention(q, k_pages, v_pages, q_start, q_lens, block_tables, *, scale=None,
                      softcap=None, impl: str = "auto", **tuning):
    """A chunk of queries per sequence, causal over its pages (see reference.prefill_attention)."""
    fam, interpret = _resolve(impl)
    if fam == "reference":
        return reference.prefill_attention(q, k_pages, v_pages, q_start, q_lens, block_tables,
                                           scale=scale, softcap=softcap)
    if fam == "tpu":
        from .paged_attention_tpu import prefill_attention_tpu

        return prefill_attention_tpu(q, k_pages, v_pages, q_start, q_lens, block_tables,
                                     scale=scale, softcap=softcap, interpret=interpret, **tuning)
    from .paged_attention_gpu import prefill_attention_pallas_gpu

    return prefill_attention_pallas_gpu(q, k_pages, v_pages, q_start, q_lens, block_tables,
                                        scale=scale, softcap=softcap, interpret=interpret, **tuning)
