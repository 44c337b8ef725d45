"""The decode call's per-slot rows kept between steps (slot_rows.py) equal rows rebuilt from scratch
each step, through random admissions, page growth, frees, preemptions and slot reuse."""

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as hs
from jtrail.serving.engine.batch import DecodeRow
from jtrail.serving.engine.block_manager import BlockManager
from jtrail.serving.engine.sampling import sampling_rows
from jtrail.serving.engine.slot_rows import SlotSampling, SlotTables
from jtrail.serving.sequence import SamplingParams, Sequence

SLOTS, MAX_PAGES = 6, 8


def rebuilt_tables(rows: list[DecodeRow]) -> np.ndarray:
    tables = np.zeros((SLOTS, MAX_PAGES), np.int32)
    for r in rows:
        tables[r.slot, :len(r.seq.block_table)] = r.seq.block_table
    return tables


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.tuples(hs.sampled_from(["admit", "grow", "free", "step", "drop"]),
                          hs.integers(0, 10**6)), min_size=1, max_size=60))
def test_slot_rows_equal_a_fresh_rebuild(ops):
    blocks = BlockManager(num_pages=40, page_size=4)
    tables, sampling = SlotTables(SLOTS, MAX_PAGES), SlotSampling(SLOTS)
    reqs, slots, n_req = {}, {}, 0  # slot -> running sequence
    for op, x in ops:
        free = [b for b in range(SLOTS) if b not in slots]
        if op == "admit" and free and blocks.can_allocate(1):
            n_req += 1
            params = SamplingParams(temperature=(x % 3) / 2, top_p=[1.0, 0.9][x % 2], top_k=x % 4, seed=x)
            seq = Sequence(f"r{n_req}", [1, 2, 3], params, 0.0, output_ids=[7] * (x % 5))
            seq.slot = free[x % len(free)]
            blocks.allocate(seq, 1)
            reqs[seq.request_id] = SimpleNamespace(seed=x % 2**32)
            slots[seq.slot] = seq
        elif op == "grow" and slots:
            seq = list(slots.values())[x % len(slots)]
            if len(seq.block_table) < MAX_PAGES and blocks.can_allocate(1):
                blocks.allocate(seq, 1)
                seq.output_ids.append(5)
        elif op == "free" and slots:  # a finish, or a recompute preemption re-admitted to its slot
            seq = list(slots.values())[x % len(slots)]
            blocks.free(seq)
            if x % 2 and blocks.can_allocate(1):
                blocks.allocate(seq, 1)
            else:
                del slots[seq.slot]
        elif op == "drop" and slots:  # a slot whose request has no decode row this step
            pass
        skip = x % (SLOTS + 1) if op == "drop" else -1
        rows = [DecodeRow(seq, 1, ahead=x % 2) for b, seq in sorted(slots.items()) if b != skip]
        np.testing.assert_array_equal(tables.update(rows), rebuilt_tables(rows))
        got = sampling.rows(rows, reqs, steps=2)
        per_slot = [None] * SLOTS
        for r in rows:
            per_slot[r.slot] = r.seq
        want = sampling_rows(per_slot, reqs, steps=2)
        for name, g, w in zip(want._fields, got, want, strict=True):
            if name == "gen_index":  # the rebuilt rows know nothing of tokens in flight
                w = w + np.array([x % 2 if s is not None else 0 for s in per_slot], np.int32)
            np.testing.assert_array_equal(g, w, err_msg=name)
