"""jtrail.kernels: paged-attention Pallas kernels and their plain-jnp references.

Layout and semantics: kernels/reference.py. The engine calls the dispatchers in kernels/ops.py.
"""

from .ops import decode_attention, prefill_attention, write_kv

__all__ = ["decode_attention", "prefill_attention", "write_kv"]
