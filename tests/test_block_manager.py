"""Stateful hypothesis test of the KV page allocator: no double allocation, no leak, all pages free at
the end, under random admit / grow / preempt / cancel sequences."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from jtrail.serving.engine.block_manager import NULL_PAGE, BlockManager, OutOfPagesError
from jtrail.serving.sequence import SamplingParams, Sequence

NUM_PAGES, PAGE = 24, 4


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_PAGES, PAGE)
        self.live: dict[str, tuple[Sequence, int]] = {}  # id -> (seq, tokens it must hold)
        self.n = 0

    @rule(tokens=st.integers(1, 40))
    def admit(self, tokens):
        seq = Sequence(f"s{self.n}", [1] * tokens, SamplingParams(), 0.0)
        self.n += 1
        need = -(-tokens // PAGE)
        free_before = self.bm.num_free
        ok = self.bm.ensure_capacity(seq, tokens)
        assert ok == (need <= free_before)  # exact accounting: refuses only when short of pages
        if ok:
            self.live[seq.request_id] = (seq, tokens)
        else:
            assert seq.block_table == [] and self.bm.num_free == free_before

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.integers(1, 9))
    def grow(self, data, extra):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        seq, tokens = self.live[rid]
        if self.bm.ensure_capacity(seq, tokens + extra):
            self.live[rid] = (seq, tokens + extra)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt_or_cancel(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        seq, _ = self.live.pop(rid)
        n = len(seq.block_table)
        free_before = self.bm.num_free
        assert self.bm.free(seq) == n and self.bm.num_free == free_before + n and seq.block_table == []

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        owned = [p for seq, _ in self.live.values() for p in seq.block_table]
        assert len(owned) == len(set(owned)), "a page is in two block tables"
        assert NULL_PAGE not in owned
        assert self.bm.num_used == len(owned) and self.bm.num_free == NUM_PAGES - 1 - len(owned)
        for seq, tokens in self.live.values():
            assert len(seq.block_table) == -(-tokens // PAGE)  # exactly enough, never more
            assert all(self.bm.owner_of(p) == seq.request_id for p in seq.block_table)

    def teardown(self):  # end of every run: freeing all live sequences returns every page
        for seq, _ in self.live.values():
            self.bm.free(seq)
        assert self.bm.num_free == NUM_PAGES - 1 and self.bm.num_used == 0


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_errors():
    bm = BlockManager(4, 2)
    seq = Sequence("a", [1], SamplingParams(), 0.0)
    with pytest.raises(OutOfPagesError):
        bm.allocate(seq, 4)  # only 3 usable (page 0 is reserved)
    bm.allocate(seq, 3)
    assert sorted(seq.block_table) == [1, 2, 3]
    other = Sequence("b", [1], SamplingParams(), 0.0)
    other.block_table = [1]  # a table naming someone else's page is caught, not silently freed
    with pytest.raises(AssertionError):
        bm.free(other)
    with pytest.raises(ValueError):
        BlockManager(1, 4)
