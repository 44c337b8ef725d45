"""The engine's device programs: the jitted prefill, decode and mixed steps.

`ModelRunner` (model_runner.py) owns the state these take (weights as flat leaves, the paged KV cache,
the fixed-address buffers of step_buffers.py) and calls them; here is what runs on the device. Their
inputs come packed (step_inputs.py). The steps are module-level functions keyed on `StepStatics`
(static jit arguments), so engines share compiled code. Prefill runs every chunk of a step in one
packed call; decode runs `decode_steps` tokens for every slot; a mixed step runs a step's chunks and
decode rows in one forward. Each rotates over up to three compiled copies (`_DECODE_CALLS`, ...), so a
copy's CUDA graph finds its buffers where it left them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from functools import wraps
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ...kernels import ops
from ...models.attention import unpack_qkv
from ...models.llama import rope_rows
from ...models.sampling import sample_tokens
from ...models.sharding import shard_attention_fn
from .batch import SamplingRows
from .step_buffers import DecodeIO, PrefillIO
from .step_inputs import (
    PrefillInputs,
    PrefillLayout,
    _prefill_slots,
    _unpack_decode_inputs,
    _unpack_prefill_inputs,
)

__all__ = ["PagedMeta", "MixedMeta", "StepStatics", "make_paged_attention", "intern_statics", "TRACE_COUNTS",
           "BACKEND_COMPILES"]


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


def make_paged_attention(impl: str, rope_in_kernel: bool = False):
    """attn_fn for models/attention.py's contract: write the step's K/V into the pages, then attend.
    Its `packed_qkv` takes the fused projection's output whole: the kernels read k and v (and, in
    decode, q) in place. With `rope_in_kernel` (GPU kernels only) a decode-only step's layer is one
    kernel from the raw projection (`rotary_qkv`: RoPE, K/V write and attention; ops.decode_rope_write)."""

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

    def rotary_qkv(qkv, positions, inv_freq, layer_cache, meta: PagedMeta | MixedMeta):
        b, t, hkv, g2, d = qkv.shape
        if t != 1 or isinstance(meta, MixedMeta):  # decode rows only (prefill and mixed: the model's RoPE)
            return None
        out, *caches = ops.decode_rope_write(qkv.reshape(b, hkv, g2, d), *layer_cache, _decode_lengths(meta),
                                             meta.block_tables, meta.slot_mapping,
                                             rope_rows(positions[:, 0], inv_freq), impl=impl)
        return out[:, None], tuple(caches)

    paged_attention.packed_qkv = packed_qkv
    check_rope_in_kernel(impl, rope_in_kernel)
    if rope_in_kernel:
        paged_attention.rotary_qkv = rotary_qkv
    return paged_attention


def check_rope_in_kernel(impl: str, rope_in_kernel: bool) -> None:
    """ValueError unless `impl` has the kernel that rope_in_kernel needs (the GPU family's)."""
    if rope_in_kernel and ops.family(impl) != "gpu":
        raise ValueError(f"rope_in_kernel: needs the GPU kernels (kernel_impl 'pallas' on a GPU or "
                         f"'pallas_interpret'), got kernel_impl {impl!r} on {jax.default_backend()}")


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
    rope_in_kernel: bool = False  # decode steps: RoPE + K/V write + attention in one kernel a layer

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
    attn_fn = make_paged_attention(st.impl, st.rope_in_kernel)
    return attn_fn if st.mesh is None else shard_attention_fn(attn_fn, st.mesh, "paged")


def _merge(st: StepStatics, leaves):
    """The model from the flat weight leaves (flattening an nnx.State at every call is host time)."""
    return nnx.merge(st.graphdef, jax.tree_util.tree_unflatten(st.state_treedef, leaves))


def _probe_probs(st: StepStatics, probe_state, h: jax.Array) -> jax.Array:
    return nnx.merge(st.probe_graphdef, probe_state).probs(h)


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


def _program_copy(program, i: int, prefix: str = ""):
    """The same program under another name, so XLA compiles it as executable i of its own (see
    `ModelRunner(decode_graphs=..., prefill_graphs=...)`)."""
    if i == 0 and not prefix:
        return program

    @wraps(program)  # (its signature too: jit finds the static and donated arguments by name)
    def copy(*args, **kwargs):
        return program(*args, **kwargs)

    copy.__name__ = copy.__qualname__ = f"{program.__name__}_{prefix}{i}"
    return copy


# the KV cache and the staged inputs/outputs are donated (updated in place); the statics (and the
# prefill packing's layout, the decode step's sampling variant) are the jit key
_DECODE_CALLS = tuple(jax.jit(_program_copy(_decode_program, i), static_argnames=("st", "filtered"),
                              donate_argnames=("caches", "io")) for i in range(3))
# the decode step with GEMMs as cuBLAS calls (EngineConfig.decode_gemms): its own function objects, so
# its compilations are cached apart from _DECODE_CALLS'
_CUBLAS = {"xla_gpu_enable_triton_gemm": False}
_DECODE_CALLS_CUBLAS = tuple(jax.jit(_program_copy(_decode_program, i, "cublas_"),
                                     static_argnames=("st", "filtered"), donate_argnames=("caches", "io"),
                                     compiler_options=_CUBLAS) for i in range(3))
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
