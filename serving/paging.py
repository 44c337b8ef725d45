"""Page arithmetic of the paged KV cache, shared by the allocator, the policies, the simulator, the router
and the runners: one rule for how many fixed-size pages a number of tokens occupies."""

from __future__ import annotations


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` tokens (ceil division; 0 tokens need 0 pages)."""
    return -(-num_tokens // page_size)


__all__ = ["pages_for"]
