"""The one page-count rule and the one power-of-two bucket rule, against plain definitions."""

from __future__ import annotations

import math

from jtrail.models.shapes import pow2_bucket
from jtrail.serving.paging import pages_for


def test_pages_for_is_ceil_division():
    for ps in (1, 4, 16):
        for n in range(0, 100):
            assert pages_for(n, ps) == math.ceil(n / ps)


def test_pow2_bucket_is_the_smallest_power_of_two_at_or_above():
    for n in range(0, 300):
        want = next(2**k for k in range(12) if 2**k >= n)
        assert pow2_bucket(n) == want
        assert pow2_bucket(n, 64) == max(64, want)
