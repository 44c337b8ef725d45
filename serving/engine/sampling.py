"""Per-row sampling inputs of a step (temperature, top-p, top-k, seed, tokens generated, forced tokens),
and the async token feed: which row of the call in flight a decode row takes its input token from."""

from __future__ import annotations

import numpy as np

from ..sequence import Sequence
from .batch import EMPTY_ROW, Fed, SamplingRows, StepBatch
from .request_state import EngineRequest
from .slot_rows import SlotSampling


def link_fed(batch: StepBatch, prev: StepBatch) -> None:
    """Async: point each decode row with tokens in flight at its input token among `prev`'s sampled
    tokens (the device output of the call in flight: no host round trip for the token ids)."""
    decoded = {id(r.seq): r.steps - 1 for r in prev.decodes}
    prefilled = {id(ch.seq): c for c, ch in enumerate(prev.prefills) if ch.completes}
    for r in batch.decodes:
        if r.ahead:
            j = decoded.get(id(r.seq))
            r.fed = Fed(True, prefilled[id(r.seq)]) if j is None else Fed(False, j)


def fill_sampling(batch: StepBatch, reqs: dict[str, EngineRequest], slots: SlotSampling,
                  decode_steps: int) -> None:
    """The batch's sampling rows: one per prefill chunk, and one per slot for the decode call (kept
    per slot between steps by `slots`)."""
    if batch.prefills:
        batch.prefill_sampling = sampling_rows([c.seq for c in batch.prefills], reqs)
    if batch.decodes:
        batch.decode_sampling = slots.rows(batch.decodes, reqs, decode_steps)


def sampling_rows(seqs: list[Sequence | None], reqs: dict[str, EngineRequest],
                  steps: int = 1) -> SamplingRows:
    """One row per sequence (None: an empty row), each draw after the tokens generated so far."""
    def col(f, dtype, empty):  # empty slots get EMPTY_ROW's harmless values
        return np.array([f(s) if s is not None else empty for s in seqs], dtype)

    gen = col(lambda s: s.num_generated, np.int32, EMPTY_ROW.gen_index)
    forced = np.full((len(seqs), steps), EMPTY_ROW.forced, np.int32)  # trace replay: the given tokens
    for b, s in enumerate(seqs):
        if s is not None and s.params.forced_output_ids:
            forced[b] = [s.forced_token(int(gen[b]) + j) for j in range(steps)]
    return SamplingRows(col(lambda s: s.params.temperature, np.float32, EMPTY_ROW.temperature),
                        col(lambda s: s.params.top_p, np.float32, EMPTY_ROW.top_p),
                        col(lambda s: s.params.top_k, np.int32, EMPTY_ROW.top_k),
                        col(lambda s: reqs[s.request_id].seed, np.uint32, EMPTY_ROW.seed), gen, forced)
