"""The engine's device programs: the jitted prefill and decode steps and their inputs.

`ModelRunner` (model_runner.py) owns the state these take (weights as flat leaves, the paged KV cache,
the decode call's fixed-address buffers) and calls them; here is what runs on the device. The steps
are module-level functions keyed on `StepStatics` (static jit arguments), so engines share compiled
code. Prefill runs every chunk of a step in one packed call; decode runs `decode_steps` tokens for
every slot, its inputs staged into donated buffers that keep their addresses (CUDA graphs are not
updated), rotating over up to three compiled copies of the step (`_DECODE_CALLS`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from functools import partial, wraps
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...kernels import ops
from ...models.attention import unpack_qkv
from ...models.sampling import sample_tokens
from ...models.sharding import shard_attention_fn
from .batch import SamplingRows

__all__ = ["PagedMeta", "PrefillInputs", "PrefillLayout", "PrefillIO", "DecodeInputs", "DecodeIO",
           "StepStatics", "make_paged_attention", "pack_decode_inputs", "pack_prefill_inputs",
           "intern_statics", "TRACE_COUNTS", "BACKEND_COMPILES"]


class PagedMeta(NamedTuple):
    """What the paged attention fn needs besides q/k/v (all int32 device arrays)."""

    slot_mapping: jax.Array  # [B*T] flat cache slot of each new token (page*page_size+offset), <0 skip
    block_tables: jax.Array  # [B, max_pages_per_seq]
    q_start: jax.Array  # [B] position of the first new token
    q_lens: jax.Array  # [B] number of valid new tokens (0 = inactive row)


class MixedMeta(NamedTuple):
    """A mixed step's attention metadata: S decode rows of one token, then R prefill rows of T tokens,
    flattened into one [1, S + R * T] token batch (vLLM v1's unified batch)."""

    slot_mapping: jax.Array  # [S + R * T] flat cache slot of every token, <0 skip
    decode: PagedMeta  # the S decode rows (its slot_mapping: theirs)
    prefill: PagedMeta  # the R prefill rows


def _decode_lengths(meta: PagedMeta) -> jax.Array:
    """Decode: one query per row attends to [0, pos]; inactive rows (q_lens 0) to nothing."""
    return jnp.where(meta.q_lens > 0, meta.q_start + 1, 0).astype(jnp.int32)


def make_paged_attention(impl: str):
    """attn_fn for models/attention.py's contract: write the step's K/V into the pages, then attend.
    Its `packed_qkv` takes the fused projection's output whole: the kernels read k and v (and, in
    decode, q) in place."""

    def attend(q, caches, meta: PagedMeta):
        if q.shape[1] == 1:
            return ops.decode_attention(q[:, 0], *caches, _decode_lengths(meta), meta.block_tables,
                                        impl=impl)[:, None]
        return ops.prefill_attention(q, *caches, meta.q_start, meta.q_lens, meta.block_tables, impl=impl)

    def paged_attention(q, k, v, layer_cache, meta: PagedMeta):
        if isinstance(meta, MixedMeta):
            raise TypeError("a mixed step's attention takes the fused qkv (packed_qkv)")
        b, t, hkv, d = k.shape
        caches = tuple(ops.write_kv(*layer_cache, k.reshape(b * t, hkv, d), v.reshape(b * t, hkv, d),
                                    meta.slot_mapping, impl=impl))
        return attend(q, caches, meta), caches

    def packed_qkv(qkv, layer_cache, meta: PagedMeta | MixedMeta):  # qkv [B, T, Hkv, G + 2, D]
        b, t, hkv, g2, d = qkv.shape
        rows = qkv.reshape(b * t, hkv, g2, d)  # free
        caches = tuple(ops.write_kv_from_qkv(*layer_cache, rows, meta.slot_mapping, impl=impl))
        if isinstance(meta, MixedMeta):  # every token's K/V written first: a prefill row sees the rows before
            s, r = meta.decode.block_tables.shape[0], meta.prefill.block_tables.shape[0]
            dec = ops.decode_attention_from_qkv(rows[:s], *caches, _decode_lengths(meta.decode),
                                                meta.decode.block_tables, impl=impl)
            q = unpack_qkv(rows[s:].reshape(r, (b * t - s) // r, hkv, g2, d))[0]
            pre = attend(q, caches, meta.prefill)
            out = jnp.concatenate([dec, pre.reshape(-1, *dec.shape[1:])])
            return out.reshape(b, t, *dec.shape[1:]), caches
        if t == 1:
            out = ops.decode_attention_from_qkv(rows, *caches, _decode_lengths(meta), meta.block_tables,
                                                impl=impl)[:, None]
        else:  # prefill: the query rows go to the kernel as their own array (one copy)
            out = attend(unpack_qkv(qkv)[0], caches, meta)
        return out, caches

    paged_attention.packed_qkv = packed_qkv
    return paged_attention


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


def _sample(logits: jax.Array, s: SamplingRows, offset: jax.Array | int = 0,
            filtered: bool = True) -> jax.Array:
    keys = jax.vmap(lambda sd, i: jax.random.fold_in(jax.random.PRNGKey(sd), i))(s.seed, s.gen_index + offset)
    sampled = sample_tokens(logits, keys, s.temperature, s.top_p, s.top_k, filtered=filtered)
    forced = jax.lax.dynamic_index_in_dim(s.forced, offset, axis=1, keepdims=False)
    return jnp.where(forced >= 0, forced, sampled)


@dataclass(frozen=True)
class StepStatics:
    """Everything static about a step: the jit cache key. Engines with equal statics (and shapes)
    share compiled code, so tests and benchmarks that build several engines compile once."""

    graphdef: Any
    probe_graphdef: Any
    probe_layer: int | None
    page_size: int
    decode_steps: int
    impl: str
    num_bins: int
    mesh: Any = None  # tensor-parallel jax.sharding.Mesh; None = one device
    state_treedef: Any = None  # the weights' pytree structure: calls pass the flat leaves

    # jit hashes its static arguments on every call: hashing the model's graphdef anew cost
    # milliseconds of host time per step (more than a small model's device time), so it is cached
    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", h)
        return h


_INTERNED: dict[StepStatics, StepStatics] = {}


def intern_statics(st: StepStatics) -> StepStatics:
    """One instance per distinct statics: jit then finds its cache entry by identity, not by a deep
    comparison of two equal graphdefs on every call."""
    return _INTERNED.setdefault(st, st)


TRACE_COUNTS: Counter = Counter()  # (kind, statics) -> number of traces = number of compilations
# Every XLA backend compile in the process (count, seconds), whatever triggered it: TRACE_COUNTS sees
# retraces of the two jitted steps only, and an eager jnp op on the host path compiles without one.
BACKEND_COMPILES = {"n": 0, "s": 0.0}


def _count_backend_compile(event: str, secs: float, **_kw: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        BACKEND_COMPILES["n"] += 1
        BACKEND_COMPILES["s"] += secs


jax.monitoring.register_event_duration_secs_listener(_count_backend_compile)


def _attention(st: StepStatics):
    """Under TP the paged kernels run once per kv-head shard (shard_map)."""
    attn_fn = make_paged_attention(st.impl)
    return attn_fn if st.mesh is None else shard_attention_fn(attn_fn, st.mesh, "paged")


def _merge(st: StepStatics, leaves):
    """The model from the flat weight leaves (flattening an nnx.State at every call is host time)."""
    return nnx.merge(st.graphdef, jax.tree_util.tree_unflatten(st.state_treedef, leaves))


def _probe_probs(st: StepStatics, probe_state, h: jax.Array) -> jax.Array:
    return nnx.merge(st.probe_graphdef, probe_state).probs(h)


class PrefillIO(NamedTuple):
    """A packed prefill call's input and outputs in device buffers that keep their addresses (as
    DecodeIO), one set per capacity and compiled copy: with fresh arrays every call the prefill
    executable's CUDA graph was updated on each call (H200: ~1.0 ms of host time, ENGINE_NOTES.md)."""

    packed: jax.Array  # [R, W] int32 pack_prefill_inputs' array
    out_tokens: jax.Array  # [R] int32 per chunk: the token sampled after its last one
    out_probs: jax.Array  # [R, max(K, 1)] f32 per chunk: the probe's bin probabilities (zeros without one)
    out_taps: jax.Array  # [R, tap_width] f32 per chunk: the running prompt-tap sums


@partial(jax.jit, donate_argnames=("io",))
def _stage_prefill(io: PrefillIO, packed) -> PrefillIO:
    """Write a prefill call's packed inputs into its donated buffer."""
    return io._replace(packed=io.packed.at[:].set(packed))


@partial(jax.jit, static_argnames=("probs",))
def _collect_prefill(io: PrefillIO, probs: bool):
    """Copies of the call's outputs (probs None without a probe): a later call donates the buffers
    while the host may still read these. The taps are always copied (a few KB), so whether a step
    keeps them is no second compiled variant met first under traffic."""
    return io.out_tokens + 0, (io.out_probs + 0 if probs else None), io.out_taps + 0


def _prefill_program(st: StepStatics, state, caches, probe_state, io: PrefillIO, layout: PrefillLayout):
    """Every prefill chunk of a step in one call; `io.packed`: pack_prefill_inputs' array. Rows [R, T]
    are consecutive T-token pieces of the chunks (a chunk spans several rows; each layer writes all
    rows' K/V before attending, so a row sees the rows before it). Per chunk c (up to R): the token
    after its last one is sampled from row last_row[c]; the probe sees the running prompt-tap sum
    tap_in[c] plus this call's prompt tokens. Outputs are written into io's buffers."""
    TRACE_COUNTS["prefill", st] += 1
    inputs = _unpack_prefill_inputs(io.packed, layout)
    tokens, q_lens = inputs.tokens, inputs.q_lens
    positions, slot_mapping = _prefill_slots(inputs, st.page_size)
    model = _merge(st, state)
    meta = PagedMeta(slot_mapping, inputs.block_tables, inputs.start, q_lens)
    out = model(tokens, positions, caches, _attention(st), meta, tap_layer=st.probe_layer,
                logits_index=jnp.maximum(q_lens - 1, 0))
    io = io._replace(out_tokens=io.out_tokens.at[:].set(_sample(out.logits[inputs.last_row], inputs.samp)))
    if st.probe_layer is not None:
        tap_acc, probs = _prefill_probe(st, probe_state, inputs, positions, out.tap)
        io = io._replace(out_probs=io.out_probs.at[:].set(probs), out_taps=io.out_taps.at[:].set(tap_acc))
    return out.caches, io


def _prefill_probe(st: StepStatics, probe_state, inputs: PrefillInputs, positions, tap) -> tuple:
    """Per chunk: the running prompt-tap sum (tap_in plus this call's prompt tokens) and the probe's
    bin probabilities on its mean. tap [R, T, d]: the rows' hidden states at the probe's layer."""
    t = inputs.tokens.shape[1]
    valid = ((jnp.arange(t)[None, :] < inputs.q_lens[:, None])
             & (positions < inputs.n_prompt[inputs.row_chunk][:, None]))
    rows = jnp.sum(jnp.where(valid[..., None], tap.astype(jnp.float32), 0.0), axis=1)
    tap_acc = inputs.tap_in + jax.ops.segment_sum(rows, inputs.row_chunk, num_segments=inputs.tap_in.shape[0])
    count = jnp.maximum(jnp.minimum(inputs.chunk_end, inputs.n_prompt), 1).astype(jnp.float32)
    return tap_acc, _probe_probs(st, probe_state, tap_acc / count[:, None])


def _mixed_program(st: StepStatics, state, caches, probe_state, io: DecodeIO, pio: PrefillIO,
                   layout: PrefillLayout, filtered: bool = True):
    """One forward for a step's decode rows and prefill chunks (one token per decode call only): the
    S decode rows and the R x T prefill tokens go through every layer as one [1, S + R * T] batch, so
    the layers' small kernels run (and launch) once; attention splits them (MixedMeta). The decode
    rows' results go to `io`, the chunks' to `pio`, as _decode_program's and _prefill_program's."""
    TRACE_COUNTS["mixed", st] += 1
    dec = _unpack_decode_inputs(io.tokens, io.packed, 1)
    pre = _unpack_prefill_inputs(pio.packed, layout)
    s, (r, t) = dec.tokens.shape[0], pre.tokens.shape
    ps, rows = st.page_size, jnp.arange(dec.tokens.shape[0])
    live = dec.n_valid > 0
    page = dec.block_tables[rows, jnp.minimum(dec.positions // ps, dec.block_tables.shape[1] - 1)]
    dec_slots = jnp.where(live, page * ps + dec.positions % ps, -1)
    pre_positions, pre_slots = _prefill_slots(pre, ps)
    meta = MixedMeta(jnp.concatenate([dec_slots, pre_slots]),
                     PagedMeta(dec_slots, dec.block_tables, dec.positions, live.astype(jnp.int32)),
                     PagedMeta(pre_slots, pre.block_tables, pre.start, pre.q_lens))
    tokens = jnp.concatenate([dec.tokens, pre.tokens.reshape(-1)])[None]
    positions = jnp.concatenate([dec.positions, pre_positions.reshape(-1)])[None]
    # logits for every decode row and, per chunk, its last token (row last_row[c], its q_len - 1)
    last = s + pre.last_row * t + jnp.maximum(pre.q_lens[pre.last_row] - 1, 0)
    out = _merge(st, state)(tokens, positions, caches, _attention(st), meta, tap_layer=st.probe_layer,
                            logits_index=jnp.concatenate([rows, last])[None])
    samp = SamplingRows(*(jnp.concatenate([a, b]) for a, b in zip(dec.samp, pre.samp, strict=True)))
    new = _sample(out.logits[0], samp, 0, filtered)
    io = io._replace(out_tokens=io.out_tokens.at[:].set(new[None, :s]))
    pio = pio._replace(out_tokens=pio.out_tokens.at[:].set(new[s:]))
    if st.probe_layer is not None:
        tap = out.tap[0]
        io = io._replace(out_probs=io.out_probs.at[:].set(_probe_probs(st, probe_state, tap[:s])[None]))
        tap_acc, probs = _prefill_probe(st, probe_state, pre, pre_positions, tap[s:].reshape(r, t, -1))
        pio = pio._replace(out_probs=pio.out_probs.at[:].set(probs), out_taps=pio.out_taps.at[:].set(tap_acc))
    return out.caches, io, pio


@partial(jax.jit, donate_argnames=("io", "pio"))
def _stage_mixed(io: DecodeIO, pio: PrefillIO, tokens, packed, prefill_packed) -> tuple[DecodeIO, PrefillIO]:
    """_stage_decode and _stage_prefill in one dispatch."""
    io = io._replace(tokens=io.tokens.at[:].set(tokens.astype(jnp.int32)), packed=io.packed.at[:].set(packed))
    return io, pio._replace(packed=pio.packed.at[:].set(prefill_packed))


@partial(jax.jit, static_argnames=("probs",))
def _collect_mixed(io: DecodeIO, pio: PrefillIO, probs: bool):
    """_collect_prefill's and _collect_decode's copies in one dispatch."""
    return _collect_prefill(pio, probs), (io.out_tokens + 0, io.out_probs + 0)


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


class DecodeIO(NamedTuple):
    """The decode call's per-step inputs and outputs, kept in device buffers whose addresses never
    change: every call donates them and gets them back (`_stage_decode` writes the step's inputs into
    them, the decode call its outputs). XLA runs the decode step as one CUDA graph; when a buffer it
    touches moves, the graph is updated and the next launch uploads it again. With fresh input and
    output arrays each step that cost ~1.1 ms of host time per call on the H200 for SmolLM2's ~400
    kernels, more than the device's whole step (ENGINE_NOTES.md)."""

    tokens: jax.Array  # [S] int32 the last token of each slot
    packed: jax.Array  # [S, W] int32 pack_decode_inputs' array
    out_tokens: jax.Array  # [n, S] int32 the call's sampled tokens
    out_probs: jax.Array  # [n, S, max(K, 1)] f32 the probe's bin probabilities (zeros without a probe)


@partial(jax.jit, donate_argnames=("io",))
def _stage_decode(io: DecodeIO, tokens, packed) -> DecodeIO:
    """Write a step's inputs into the donated buffers (a small graph of its own: its updates are cheap)."""
    return io._replace(tokens=io.tokens.at[:].set(tokens.astype(jnp.int32)),
                       packed=io.packed.at[:].set(packed))


@jax.jit
def _collect_decode(io: DecodeIO) -> tuple[jax.Array, jax.Array]:
    """Copies of the call's outputs: the next call donates the buffers while the host may still read
    these (async scheduling fetches a step's tokens after the next step is dispatched)."""
    return io.out_tokens + 0, io.out_probs + 0


def _decode_program(st: StepStatics, state, caches, probe_state, io: DecodeIO, filtered: bool = True):
    """`io`: the staged inputs (DecodeIO); `filtered`: some row samples with top-p or top-k (static:
    two compiled variants, both warmed up; without it the vocabulary is not sorted)."""
    TRACE_COUNTS["decode", st] += 1
    inputs = _unpack_decode_inputs(io.tokens, io.packed, st.decode_steps)
    tokens, positions, n_valid = inputs.tokens, inputs.positions, inputs.n_valid
    block_tables, samp = inputs.block_tables, inputs.samp
    model = _merge(st, state)
    attn_fn = _attention(st)
    rows = jnp.arange(tokens.shape[0])
    n, ps = st.decode_steps, st.page_size

    def one_step(j, carry):
        caches, tok, out_tokens, out_probs = carry
        pos = positions + j
        live = j < n_valid
        page = block_tables[rows, jnp.minimum(pos // ps, block_tables.shape[1] - 1)]
        slot = jnp.where(live, page * ps + pos % ps, -1)
        meta = PagedMeta(slot, block_tables, pos, live.astype(jnp.int32))
        out = model(tok[:, None], pos[:, None], caches, attn_fn, meta, tap_layer=st.probe_layer,
                    logits_index=jnp.zeros_like(tok))
        new = _sample(out.logits, samp, j, filtered)
        out_tokens = out_tokens.at[j].set(new)
        if st.probe_layer is not None:
            out_probs = out_probs.at[j].set(_probe_probs(st, probe_state, out.tap[:, 0]))
        return out.caches, new, out_tokens, out_probs

    init = (caches, tokens, jnp.zeros_like(io.out_tokens), jnp.zeros_like(io.out_probs))
    caches, _, out_tokens, out_probs = jax.lax.fori_loop(0, n, one_step, init)
    # written into the donated buffers, so the outputs keep their addresses too
    return caches, io._replace(out_tokens=io.out_tokens.at[:].set(out_tokens),
                               out_probs=io.out_probs.at[:].set(out_probs))


def _program_copy(program, i: int):
    """The same program under another name, so XLA compiles it as executable i of its own (see
    `ModelRunner(decode_graphs=..., prefill_graphs=...)`)."""
    if i == 0:
        return program

    @wraps(program)  # (its signature too: jit finds the static and donated arguments by name)
    def copy(*args, **kwargs):
        return program(*args, **kwargs)

    copy.__name__ = copy.__qualname__ = f"{program.__name__}_{i}"
    return copy


# the KV cache and the staged inputs/outputs are donated (updated in place); the statics (and the
# prefill packing's layout, the decode step's sampling variant) are the jit key
_DECODE_CALLS = tuple(jax.jit(_program_copy(_decode_program, i), static_argnames=("st", "filtered"),
                              donate_argnames=("caches", "io")) for i in range(3))
_PREFILL_CALLS = tuple(jax.jit(_program_copy(_prefill_program, i), static_argnames=("st", "layout"),
                               donate_argnames=("caches", "io")) for i in range(3))
_MIXED_CALLS = tuple(jax.jit(_program_copy(_mixed_program, i), static_argnames=("st", "layout", "filtered"),
                             donate_argnames=("caches", "io", "pio")) for i in range(3))


@jax.jit
def _fed_tokens(host_tokens, prev_decode, prev_prefill, src):
    """Async scheduling: each decode row's input token, from the host (src < 0) or from the call in
    flight's sampled tokens: flat index src into [decode tokens [n, S] raveled, prefill tokens [R]].
    A small graph of its own (one compilation per prefill capacity), so the decode step keeps one."""
    flat = jnp.concatenate([prev_decode.reshape(-1).astype(jnp.int32), prev_prefill.astype(jnp.int32)])
    return jnp.where(src >= 0, flat[jnp.maximum(src, 0)], host_tokens)
