"""Host-side KV page allocator: a free list of physical pages and one block table per sequence.

Page 0 is reserved as the null page: padded block-table entries point at it, so a kernel reading a
padded entry never touches another request's data. Every other page is owned by at most one
sequence; `owner` is kept so double allocation or a leak is detected, not silently tolerated.
"""

from __future__ import annotations

from ...models.errors import JtrailError
from ..paging import pages_for
from ..sequence import Sequence

NULL_PAGE = 0


class OutOfPagesError(JtrailError):
    """Asked for more KV pages than are free (the engine preempts before this can happen)."""


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # LIFO free list: recently freed pages are reused first (warm in cache, easy to reason about).
        self._free: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))
        self._owner: dict[int, str] = {}

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Pages that can ever be allocated (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def pages_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def owner_of(self, page: int) -> str | None:
        return self._owner.get(page)

    # ---- mutation -------------------------------------------------------------------------
    def allocate(self, seq: Sequence, n: int) -> list[int]:
        """Append `n` fresh pages to `seq.block_table` and return them."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages for {seq.request_id!r}, only {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            if p in self._owner:  # would mean the free list and owner map disagree
                raise AssertionError(f"page {p} allocated twice")
            self._owner[p] = seq.request_id
        seq.block_table.extend(pages)
        return pages

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens. False (nothing changed) if not enough
        pages are free."""
        have = len(seq.block_table)
        if num_tokens <= have * self.page_size:  # the common case (every decode row, every step)
            return True
        need = self.pages_for(num_tokens) - have
        if need > len(self._free):
            return False
        self.allocate(seq, need)
        return True

    def free(self, seq: Sequence) -> int:
        """Return all of `seq`'s pages to the free list; returns how many."""
        n = 0
        for p in seq.block_table:
            if self._owner.get(p) != seq.request_id:
                owner = self._owner.get(p)
                raise AssertionError(f"page {p} in {seq.request_id!r}'s table is owned by {owner!r}")
            del self._owner[p]
            self._free.append(p)
            n += 1
        seq.block_table = []
        return n

    def check_invariants(self) -> None:
        """Every non-null page is exactly one of free / owned (used by tests and debug runs)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        if NULL_PAGE in free or NULL_PAGE in self._owner:
            raise AssertionError("the null page was handed out")
        if free & set(self._owner):
            raise AssertionError("a page is both free and owned")
        if len(free) + len(self._owner) != self.num_pages - 1:
            raise AssertionError("pages leaked")
