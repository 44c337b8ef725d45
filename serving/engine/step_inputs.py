"""The jitted steps' host inputs: what one prefill or decode call takes, and its packing into one int32
array (one host-to-device copy a call; unpacked by static slices inside the graph)."""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ...models.sampling import needs_filter
from .batch import EMPTY_ROW, SamplingRows, StepBatch

__all__ = ["PrefillInputs", "PrefillLayout", "DecodeInputs", "pack_prefill_inputs", "pack_decode_inputs",
           "prefill_call_inputs"]


class PrefillInputs(NamedTuple):
    """One packed prefill call's inputs: R rows of T tokens, and per chunk c (up to R) its results'
    row and prompt (int32 host arrays except tap_in and samp). They travel to the device as one int32
    array (pack_prefill_inputs); the tokens' positions and KV slots are derived in the graph."""

    tokens: Any  # [R, T] the rows' tokens (consecutive T-token pieces of the step's chunks)
    start: Any  # [R] position of the row's first token (its tokens are at start, start + 1, ...)
    q_lens: Any  # [R] valid tokens in the row (0 = pad row)
    row_chunk: Any  # [R] the chunk a row belongs to
    last_row: Any  # [R] per chunk: the row holding its last token (the next token is sampled there)
    n_prompt: Any  # [R] per chunk: its sequence's prompt length (the probe taps prompt tokens only)
    chunk_end: Any  # [R] per chunk: the position after its last token
    block_tables: Any  # [R, max_pages_per_seq] the row's sequence's pages
    tap_in: Any  # [R, d_model] f32 per chunk: the running prompt-tap sum from its earlier chunks ([R, 0]
    # without a probe)
    samp: SamplingRows  # per chunk


class PrefillLayout(NamedTuple):
    """The widths of pack_prefill_inputs' column groups (static: a jit argument)."""

    row_tokens: int  # T
    table_width: int  # max_pages_per_seq
    tap_width: int  # d_model with a probe, else 0

    @property
    def width(self) -> int:
        """Columns of the packed array."""
        return self.row_tokens + _PREFILL_SCALARS + self.table_width + self.tap_width


_PREFILL_SCALARS = 12  # start, q_lens, row_chunk, last_row, n_prompt, chunk_end, six sampling columns


def pack_prefill_inputs(inputs: PrefillInputs) -> np.ndarray:
    """Every host input of the packed prefill call in one int32 [R, T + 12 + P + d] array (floats
    bit-cast): one host-to-device copy where there were sixteen (as pack_decode_inputs; positions and
    KV slots are derived in the graph, _prefill_slots)."""
    s = inputs.samp
    ints = [inputs.start, inputs.q_lens, inputs.row_chunk, inputs.last_row, inputs.n_prompt, inputs.chunk_end]
    cols = [np.asarray(c, np.int32) for c in ints]
    as_bits = [np.asarray(x, np.float32).view(np.int32) for x in (s.temperature, s.top_p)]
    cols += [*as_bits, np.asarray(s.top_k, np.int32), np.asarray(s.seed, np.uint32).view(np.int32),
             np.asarray(s.gen_index, np.int32), np.asarray(s.forced, np.int32).reshape(-1)]
    return np.concatenate([np.asarray(inputs.tokens, np.int32), np.stack(cols, axis=1),
                           np.asarray(inputs.block_tables, np.int32),
                           np.asarray(inputs.tap_in, np.float32).view(np.int32)], axis=1)


def _unpack_prefill_inputs(packed: jax.Array, layout: PrefillLayout) -> PrefillInputs:
    """pack_prefill_inputs' inverse, inside the jitted step (static column slices)."""
    t, p = layout.row_tokens, layout.table_width
    col = [packed[:, t + i] for i in range(_PREFILL_SCALARS)]
    as_f32 = partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    samp = SamplingRows(temperature=as_f32(col[6]), top_p=as_f32(col[7]), top_k=col[8],
                        seed=jax.lax.bitcast_convert_type(col[9], jnp.uint32), gen_index=col[10],
                        forced=col[11][:, None])
    tables_at = t + _PREFILL_SCALARS
    return PrefillInputs(tokens=packed[:, :t], start=col[0], q_lens=col[1], row_chunk=col[2], last_row=col[3],
                         n_prompt=col[4], chunk_end=col[5], block_tables=packed[:, tables_at:tables_at + p],
                         tap_in=as_f32(packed[:, tables_at + p:]), samp=samp)


def _prefill_slots(inputs: PrefillInputs, page_size: int) -> tuple[jax.Array, jax.Array]:
    """Each token's position [R, T] and flat KV slot [R * T] (page * page_size + offset; -1 past the
    row's valid tokens), from the row's start and block table."""
    r, t = inputs.tokens.shape
    positions = inputs.start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    valid = jnp.arange(t)[None, :] < inputs.q_lens[:, None]
    page_col = jnp.minimum(positions // page_size, inputs.block_tables.shape[1] - 1)
    pages = jnp.take_along_axis(inputs.block_tables, page_col, axis=1)
    slots = jnp.where(valid, pages * page_size + positions % page_size, -1)
    return positions, slots.reshape(r * t)


class DecodeInputs(NamedTuple):
    """One decode call's inputs, one row per slot (int32 [S] unless noted)."""

    tokens: Any  # the last token of each slot (a device array when fed from the call in flight)
    positions: Any  # its position
    n_valid: Any  # steps the slot may take (0 = empty slot; pages for them must be allocated)
    block_tables: Any  # [S, max_pages_per_seq]
    samp: SamplingRows


def pack_decode_inputs(inputs: DecodeInputs) -> np.ndarray:
    """Every host input of the decode call but the tokens in one int32 [S, 7 + P + n] array (floats
    bit-cast), so a step makes one host-to-device copy, not ten: on the H200 the ten small copies
    cost 0.5 ms of host time per step at batch 32 and 2 ms at batch 128 (ENGINE_NOTES.md)."""
    s = inputs.samp
    cols = [np.asarray(inputs.positions, np.int32), np.asarray(inputs.n_valid, np.int32),
            np.asarray(s.top_k, np.int32), np.asarray(s.seed, np.uint32).view(np.int32),
            np.asarray(s.gen_index, np.int32), np.asarray(s.temperature, np.float32).view(np.int32),
            np.asarray(s.top_p, np.float32).view(np.int32)]
    return np.concatenate([np.stack(cols, axis=1), np.asarray(inputs.block_tables, np.int32),
                           np.asarray(s.forced, np.int32)], axis=1)


def _unpack_decode_inputs(tokens: jax.Array, packed: jax.Array, steps: int) -> DecodeInputs:
    """pack_decode_inputs' inverse, inside the jitted step (static column slices: free)."""
    col = [packed[:, i] for i in range(7)]
    as_f32 = partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    samp = SamplingRows(temperature=as_f32(col[5]), top_p=as_f32(col[6]), top_k=col[2],
                        seed=jax.lax.bitcast_convert_type(col[3], jnp.uint32), gen_index=col[4],
                        forced=packed[:, packed.shape[1] - steps:])
    return DecodeInputs(tokens=tokens, positions=col[0], n_valid=col[1],
                        block_tables=packed[:, 7:packed.shape[1] - steps], samp=samp)


def _pad_rows(samp: SamplingRows, r: int) -> SamplingRows:
    """Pad every field to r rows: greedy, top_p 1, nothing forced (pad rows' tokens are dropped)."""
    out = []
    for a, fill in zip(samp, EMPTY_ROW, strict=True):
        a = np.asarray(a)
        padded = np.full((r, *a.shape[1:]), fill, a.dtype)
        padded[:len(a)] = a
        out.append(padded)
    return SamplingRows(*out)


def prefill_call_inputs(batch: StepBatch, layout: PrefillLayout, capacities: tuple[int, ...],
                        has_probe: bool) -> tuple[np.ndarray, PrefillLayout, bool, bool]:
    """The packed prefill call's one host array (pack_prefill_inputs), its layout, whether the
    running prompt-tap sums come back (a probe, and a prompt with chunks to come), and whether some
    chunk samples with top-p or top-k."""
    t_row = layout.row_tokens
    pieces = []  # (chunk index, start position, tokens)
    for c, ch in enumerate(batch.prefills):
        for k in range(0, len(ch.tokens), t_row):
            pieces.append((c, ch.start + k, ch.tokens[k:k + t_row]))
    need = len(pieces) * t_row
    cap = next((b for b in capacities if b >= need), None)
    if cap is None:
        raise ValueError(f"{need} padded prefill tokens exceed the packed call's {capacities[-1]}")
    r = cap // t_row
    tokens, tables = np.zeros((r, t_row), np.int32), np.zeros((r, layout.table_width), np.int32)
    start, q_lens, row_chunk, last_row, n_prompt, chunk_end = (np.zeros(r, np.int32) for _ in range(6))
    for i, (c, first, toks) in enumerate(pieces):
        bt = batch.prefills[c].seq.block_table
        tokens[i, :len(toks)], tables[i, :len(bt)] = toks, bt
        start[i], q_lens[i], row_chunk[i], last_row[c] = first, len(toks), c, i
    tap_in = np.zeros((r, layout.tap_width), np.float32)
    for c, ch in enumerate(batch.prefills):
        n_prompt[c], chunk_end[c] = ch.seq.num_prompt_tokens, ch.start + len(ch.tokens)
        if ch.tap is not None and layout.tap_width:
            tap_in[c] = ch.tap
    # Host arrays only: an eager jnp op here (stack, slice, index) compiles once per new shape,
    # measured as ~4 s pauses mid-run on the H200 that no warm-up reaches.
    inputs = PrefillInputs(tokens=tokens, start=start, q_lens=q_lens, row_chunk=row_chunk,
                           last_row=last_row, n_prompt=n_prompt, chunk_end=chunk_end,
                           block_tables=tables, tap_in=tap_in,
                           samp=_pad_rows(batch.prefill_sampling, r))
    keep_taps = has_probe and any(not ch.completes for ch in batch.prefills)
    samp = batch.prefill_sampling
    filtered = needs_filter(samp.temperature, samp.top_p, samp.top_k)
    return pack_prefill_inputs(inputs), layout, keep_taps, filtered
