"""The decode call's per-slot host rows, kept between steps (vLLM v1's persistent batch).

A decode step sends one row per batch slot: the slot's block table and its request's sampling
parameters. Both change only when another request takes the slot or the request gains a page, yet
they were rebuilt from Python lists for every slot on every step, on the host path that bounds a
small model's step. So a slot's row is rewritten only when its request or page list changes; a step
fills only what moves every step (positions, tokens generated, replayed tokens).
"""

from __future__ import annotations

import numpy as np

from ..sequence import Sequence
from .batch import EMPTY_ROW, DecodeRow, SamplingRows
from .block_manager import NULL_PAGE
from .request_state import EngineRequest


class SlotTables:
    """[num_slots, max_pages] block tables. A row mirrors the block-table list object of the slot's
    sequence: BlockManager only extends that list, and replaces it with a new one when it frees the
    pages, so the same list object with the same length means the same pages."""

    def __init__(self, num_slots: int, max_pages: int):
        self.array = np.full((num_slots, max_pages), NULL_PAGE, np.int32)
        self._lists: list[list[int] | None] = [None] * num_slots  # the list each row mirrors
        self._lens = [0] * num_slots

    def update(self, rows: list[DecodeRow]) -> np.ndarray:
        """The step's tables: rows' slots hold their pages, every other slot the null page."""
        held = set()
        for r in rows:
            b, pages = r.slot, r.seq.block_table
            held.add(b)
            n, had = len(pages), self._lens[b]
            if self._lists[b] is not pages or n < had:  # another sequence, or freed and reallocated
                self.array[b, :n] = pages
                self.array[b, n:had] = NULL_PAGE
                self._lists[b] = pages
            elif n > had:  # the sequence gained pages
                self.array[b, had:n] = pages[had:]
            self._lens[b] = n
        for b, pages in enumerate(self._lists):
            if pages is not None and b not in held:  # emptied slot: back to the null page
                self.array[b, :self._lens[b]] = NULL_PAGE
                self._lists[b], self._lens[b] = None, 0
        return self.array


class SlotSampling:
    """The decode call's sampling rows: a slot's temperature, top-p, top-k and seed are written when a
    request takes the slot; slots without a row this step are greedy with top-p 1 (no filtering)."""

    def __init__(self, num_slots: int):
        self.seqs: list[Sequence | None] = [None] * num_slots
        self.temperature = np.full(num_slots, EMPTY_ROW.temperature, np.float32)
        self.top_p = np.full(num_slots, EMPTY_ROW.top_p, np.float32)
        self.top_k = np.full(num_slots, EMPTY_ROW.top_k, np.int32)
        self.seed = np.full(num_slots, EMPTY_ROW.seed, np.uint32)

    def rows(self, decodes: list[DecodeRow], reqs: dict[str, EngineRequest], steps: int) -> SamplingRows:
        """`decodes`' rows, each draw after the row's tokens in flight (`ahead`). Arrays are the
        batch's own copies (the next step rewrites these)."""
        n = len(self.seqs)
        gen = np.zeros(n, np.int32)
        forced = np.full((n, steps), EMPTY_ROW.forced, np.int32)  # trace replay: the given tokens
        held = set()
        for r in decodes:
            b, seq = r.slot, r.seq
            held.add(b)
            if self.seqs[b] is not seq:
                p = seq.params
                self.seqs[b] = seq
                self.temperature[b], self.top_p[b], self.top_k[b] = p.temperature, p.top_p, p.top_k
                self.seed[b] = reqs[seq.request_id].seed
            g = gen[b] = len(seq.output_ids) + r.ahead
            if seq.params.forced_output_ids:
                forced[b] = [seq.forced_token(g + j) for j in range(steps)]
        for b, seq in enumerate(self.seqs):
            if seq is not None and b not in held:
                self.seqs[b] = None
                self.temperature[b], self.top_p[b], self.top_k[b], self.seed[b] = EMPTY_ROW[:4]
        return SamplingRows(self.temperature.copy(), self.top_p.copy(), self.top_k.copy(), self.seed.copy(),
                            gen, forced)
