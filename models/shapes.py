"""Static-shape bucketing: every jitted call pads its variable sizes up to a power of two, so a handful of
compilations serve any mix of lengths and batch sizes. The one rounding rule for the whole library
(the reference backend, the engine's swap copies, probe training)."""

from __future__ import annotations


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n (1 for n <= 1), and at least `minimum`."""
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


__all__ = ["pow2_bucket"]
