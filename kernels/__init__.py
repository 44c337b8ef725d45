"""jtrail.kernels: paged-attention Pallas kernels and their plain-jnp references.

Layout and semantics: kernels/reference.py. The engine calls the dispatchers in kernels/ops.py.
"""

from .ops import decode_attention, decode_attention_from_qkv, prefill_attention, write_kv, write_kv_from_qkv

__all__ = ["decode_attention", "decode_attention_from_qkv", "prefill_attention", "write_kv",
           "write_kv_from_qkv"]
