"""Device side of the engine: the paged KV cache and the jitted prefill / decode steps.

The cache is a list (one per layer) of (k_pages, v_pages), each [Hkv, num_pages, page_size, D],
donated through every jitted call so XLA updates it in place. Shapes are static: decode always runs
all `num_slots` rows for `decode_steps` steps; prefill runs every chunk of the step in one packed
call padded to one of at most len(prefill_buckets) capacities (batch.prefill_layout), so the number
of compilations is 1 + len(prefill_buckets) (+ swap buckets, see swap.py). The
jitted steps are module-level functions keyed on `StepStatics`, so engines share compiled code.

Each call returns sampled tokens and, when a probe is loaded, the probe's bin probabilities computed
in the same graph from the tap (hidden state after `probe.cfg.layer`). With no probe, tap_layer is
None and the probe code is not traced at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ...kernels import ops
from ...models.llama import Llama
from ...models.probe import ProbeHead
from ...models.sampling import needs_filter, sample_tokens
from ...models.sharding import kv_sharding, make_mesh, shard_attention_fn, shard_model
from ..paging import pages_for
from . import swap
from .batch import EMPTY_ROW, SamplingRows, StepBatch, StepOutput, prefill_layout
from .launcher import Launcher
from .slot_rows import SlotTables

__all__ = ["ModelRunner", "SamplingRows", "PagedMeta", "PrefillInputs", "DecodeInputs",
           "make_paged_attention"]


class PagedMeta(NamedTuple):
    """What the paged attention fn needs besides q/k/v (all int32 device arrays)."""

    slot_mapping: jax.Array  # [B*T] flat cache slot of each new token (page*page_size+offset), <0 skip
    block_tables: jax.Array  # [B, max_pages_per_seq]
    q_start: jax.Array  # [B] position of the first new token
    q_lens: jax.Array  # [B] number of valid new tokens (0 = inactive row)


def make_paged_attention(impl: str):
    """attn_fn for models/attention.py's contract: write the step's K/V into the pages, then attend."""

    def paged_attention(q, k, v, layer_cache, meta: PagedMeta):
        k_pages, v_pages = layer_cache
        b, t, hkv, d = k.shape
        k_pages, v_pages = ops.write_kv(k_pages, v_pages, k.reshape(b * t, hkv, d),
                                        v.reshape(b * t, hkv, d), meta.slot_mapping, impl=impl)
        if t == 1:  # decode: one query per row attends to [0, pos]
            lengths = jnp.where(meta.q_lens > 0, meta.q_start + 1, 0).astype(jnp.int32)
            out = ops.decode_attention(q[:, 0], k_pages, v_pages, lengths, meta.block_tables,
                                       impl=impl)[:, None]
        else:
            out = ops.prefill_attention(q, k_pages, v_pages, meta.q_start, meta.q_lens,
                                        meta.block_tables, impl=impl)
        return out, (k_pages, v_pages)

    return paged_attention


class PrefillInputs(NamedTuple):
    """One packed prefill call's inputs: R rows of T tokens, and per chunk c (up to R) its results'
    row and prompt (all int32 host arrays except tap_in and samp)."""

    tokens: Any  # [R, T] the rows' tokens (consecutive T-token pieces of the step's chunks)
    positions: Any  # [R, T] each token's position in its sequence
    slot_mapping: Any  # [R*T] flat KV slot of each token (page*page_size+offset), -1 = pad
    block_tables: Any  # [R, max_pages_per_seq] the row's sequence's pages
    q_lens: Any  # [R] valid tokens in the row (0 = pad row)
    row_chunk: Any  # [R] the chunk a row belongs to
    last_row: Any  # [R] per chunk: the row holding its last token (the next token is sampled there)
    n_prompt: Any  # [R] per chunk: its sequence's prompt length (the probe taps prompt tokens only)
    chunk_end: Any  # [R] per chunk: the position after its last token
    tap_in: Any  # [R, d_model] f32 per chunk: the running prompt-tap sum from its earlier chunks
    samp: SamplingRows  # per chunk


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


# the KV cache is donated (updated in place); the statics are the jit cache key
@partial(jax.jit, static_argnames=("st",), donate_argnames=("caches",))
def _prefill_packed(st: StepStatics, state, caches, probe_state, inputs: PrefillInputs):
    """Every prefill chunk of a step in one call. Rows [R, T] are consecutive T-token pieces of the
    chunks (a chunk spans several rows; each layer writes all rows' K/V before attending, so a row
    sees the rows before it). Per chunk c (up to R): the token after its last one is sampled from row
    last_row[c]; the probe sees the running prompt-tap sum tap_in[c] plus this call's prompt tokens."""
    TRACE_COUNTS["prefill", st] += 1
    tokens, positions, q_lens, tap_in = inputs.tokens, inputs.positions, inputs.q_lens, inputs.tap_in
    model = _merge(st, state)
    meta = PagedMeta(inputs.slot_mapping, inputs.block_tables, positions[:, 0], q_lens)
    out = model(tokens, positions, caches, _attention(st), meta, tap_layer=st.probe_layer,
                logits_index=jnp.maximum(q_lens - 1, 0))
    token = _sample(out.logits[inputs.last_row], inputs.samp)
    probs, tap_acc = None, tap_in
    if st.probe_layer is not None:
        t = tokens.shape[1]
        n_prompt = inputs.n_prompt
        valid = (jnp.arange(t)[None, :] < q_lens[:, None]) & (positions < n_prompt[inputs.row_chunk][:, None])
        rows = jnp.sum(jnp.where(valid[..., None], out.tap.astype(jnp.float32), 0.0), axis=1)
        tap_acc = tap_in + jax.ops.segment_sum(rows, inputs.row_chunk, num_segments=tap_in.shape[0])
        count = jnp.maximum(jnp.minimum(inputs.chunk_end, n_prompt), 1).astype(jnp.float32)
        probs = _probe_probs(st, probe_state, tap_acc / count[:, None])
    return out.caches, token, probs, tap_acc


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


def _decode_copy(i: int):
    """The same program under another name, so XLA compiles it as executable i of its own (see
    `ModelRunner(decode_graphs=...)`)."""
    if i == 0:
        return _decode_program

    def program(st: StepStatics, state, caches, probe_state, io: DecodeIO, filtered: bool = True):
        return _decode_program(st, state, caches, probe_state, io, filtered)

    program.__name__ = program.__qualname__ = f"_decode_program_{i}"
    return program


_DECODE_JIT = {"static_argnames": ("st", "filtered"), "donate_argnames": ("caches", "io")}
# the KV cache and the staged inputs/outputs are donated (updated in place); the statics are the jit key
_DECODE_CALLS = tuple(jax.jit(_decode_copy(i), **_DECODE_JIT) for i in range(3))


@jax.jit
def _fed_tokens(host_tokens, prev_decode, prev_prefill, src):
    """Async scheduling: each decode row's input token, from the host (src < 0) or from the call in
    flight's sampled tokens: flat index src into [decode tokens [n, S] raveled, prefill tokens [R]].
    A small graph of its own (one compilation per prefill capacity), so the decode step keeps one."""
    flat = jnp.concatenate([prev_decode.reshape(-1).astype(jnp.int32), prev_prefill.astype(jnp.int32)])
    return jnp.where(src >= 0, flat[jnp.maximum(src, 0)], host_tokens)


def _pad_rows(samp: SamplingRows, r: int) -> SamplingRows:
    """Pad every field to r rows: greedy, top_p 1, nothing forced (pad rows' tokens are dropped)."""
    out = []
    for a, fill in zip(samp, EMPTY_ROW, strict=True):
        a = np.asarray(a)
        padded = np.full((r, *a.shape[1:]), fill, a.dtype)
        padded[:len(a)] = a
        out.append(padded)
    return SamplingRows(*out)


class ModelRunner:
    def __init__(self, model: Llama, *, num_slots: int, num_pages: int, page_size: int,
                 max_model_len: int, decode_steps: int = 1, kv_dtype: Any = None, impl: str = "auto",
                 probe: ProbeHead | None = None, tensor_parallel: int = 1,
                 prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512),
                 max_prefill_tokens: int | None = None, decode_graphs: int = 1, launch_thread: bool = False):
        """`decode_graphs` 2 or 3: consecutive decode calls rotate over that many compiled copies of the
        step, each with its own DecodeIO. Under async scheduling call N is dispatched while N-1 runs, so
        XLA's temporary buffers of one executable alternate between two addresses and its CUDA graph is
        updated on every call; with one executable per call in flight each may find its own at the same
        place again.
        (EngineConfig checks the value.) `launch_thread`: the device calls are issued from a thread of
        their own (launcher.Launcher), so a call's launch overlaps the engine's host work."""
        cfg = model.cfg
        self.prefill_buckets = tuple(prefill_buckets)
        # the packed prefill call: rows of prefill_row_tokens, total padded tokens one of these
        self.prefill_row_tokens, self.prefill_capacities = prefill_layout(prefill_buckets, max_prefill_tokens)
        self.has_probe = probe is not None
        self.calls = 0  # device calls (prefill + decode), for the calls-per-step bound
        # tensor parallelism: weights and KV pages sharded over kv heads on a mesh of
        # `tensor_parallel` local devices; XLA partitions the jitted steps from these shardings.
        mesh = make_mesh(tensor_parallel) if tensor_parallel > 1 else None
        if mesh is not None:
            shard_model(model, mesh)
        self.cfg = cfg
        self.num_slots = num_slots
        self.page_size = page_size
        self.max_pages_per_seq = pages_for(max_model_len, page_size)
        self._tables = SlotTables(num_slots, self.max_pages_per_seq)  # the decode rows' block tables
        kv_dtype = kv_dtype or model.dtype
        shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
        # Every array the jitted steps take is committed to its device (or mesh) from the start. jit
        # keys its cache on which arguments are committed: caches made uncommitted became committed
        # after the first call (its outputs inherit the probe's committed weights), so the first
        # warmed-up shape compiled a second time mid-traffic (H200: 3.4 s, in whichever run met it).
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        kv_dev = kv_sharding(mesh, "paged") if mesh is not None else one_device
        tokens_on = NamedSharding(mesh, PartitionSpec()) if mesh is not None else one_device
        # _fed_tokens' stand-ins for a previous call that sampled nothing: committed, as the device's own
        # outputs are (an uncommitted stand-in is another compile of _fed_tokens); made once, here
        self._no_tokens = (jax.device_put(np.zeros((decode_steps, num_slots), np.int32), tokens_on),
                           jax.device_put(np.zeros(1, np.int32), tokens_on))
        self._launcher = Launcher(launch_thread)
        self._caches = [(jnp.zeros(shape, kv_dtype, device=kv_dev), jnp.zeros(shape, kv_dtype, device=kv_dev))
                       for _ in range(cfg.n_layers)]
        graphdef, state = nnx.split(model)
        self._state_leaves, treedef = jax.tree_util.tree_flatten(state)
        if mesh is None:  # (shard_model placed them on the mesh)
            self._state_leaves = jax.device_put(self._state_leaves, one_device)
        probe_graphdef, self.probe_state = None, None
        if probe is not None:
            if not 0 <= probe.cfg.layer < cfg.n_layers:
                raise ValueError(f"probe layer {probe.cfg.layer} outside [0, {cfg.n_layers})")
            probe_graphdef, self.probe_state = nnx.split(probe)
            # the probe head is small: replicated on a mesh
            self.probe_state = jax.device_put(self.probe_state, tokens_on)
        layer, bins = (probe.cfg.layer, probe.cfg.num_bins) if probe is not None else (None, 0)
        self._last: tuple[Any, Any] = (None, None)  # the last call's sampled tokens (prefill, decode)
        self._issued = (False, False)  # whether the last execute had prefill chunks, decode rows
        width = 7 + self.max_pages_per_seq + decode_steps  # pack_decode_inputs' columns
        # the decode call's fixed-address inputs and outputs (made on the device: a CPU device_put of
        # numpy may share the host memory, which a call cannot take over, so the first call moved them)
        self._ios = [DecodeIO(
            tokens=jnp.zeros(num_slots, jnp.int32, device=tokens_on),
            packed=jnp.zeros((num_slots, width), jnp.int32, device=tokens_on),
            out_tokens=jnp.zeros((decode_steps, num_slots), jnp.int32, device=tokens_on),
            out_probs=jnp.zeros((decode_steps, num_slots, max(bins, 1)), jnp.float32, device=tokens_on))
            for _ in range(decode_graphs)]
        self._turn = 0  # which decode executable (and its DecodeIO) the next call uses
        self.statics = intern_statics(StepStatics(graphdef, probe_graphdef, layer, page_size, decode_steps,
                                                  impl, bins, mesh, treedef))

    @property
    def caches(self) -> list[tuple[jax.Array, jax.Array]]:
        """The KV pages per layer, once every queued call has been issued."""
        self._launcher.drain()
        return self._caches

    @property
    def decode_graphs(self) -> int:
        """How many compiled copies of the decode step the calls rotate over."""
        return len(self._ios)

    @property
    def launch_thread(self) -> bool:
        """Whether the device calls are issued from the launcher's thread."""
        return self._launcher.threaded

    @property
    def state(self) -> nnx.State:
        """The model's weights (the jitted steps take them as flat leaves)."""
        return jax.tree_util.tree_unflatten(self.statics.state_treedef, self._state_leaves)

    @property
    def trace_counts(self) -> dict[str, int]:
        """Compilations of this runner's steps (shared with runners of equal statics)."""
        return {k: TRACE_COUNTS[k, self.statics] for k in ("prefill", "decode")}

    # ---- the Runner interface (runner.py) ---------------------------------------------------
    def execute(self, batch: StepBatch):
        """Dispatch the step: all prefill chunks in one packed call, then the decode call; returns a
        handle (no sync). The host inputs are built here; the calls are issued by the launcher."""
        had_pre, had_dec = self._issued  # the call before this one (async: still in flight)
        pre = self._prefill_inputs(batch) if batch.prefills else None
        dec = None
        if batch.decodes:
            tokens, positions, n_valid = (np.zeros(self.num_slots, np.int32) for _ in range(3))
            src = np.full(self.num_slots, -1, np.int32)
            fed_unsampled = False  # a row fed a token the previous call did not sample (a bug)
            for row in batch.decodes:
                seq, b, fed = row.seq, row.slot, row.fed
                positions[b], n_valid[b] = row.position, row.steps
                if fed is None:  # the last token so far (all_ids would copy the whole context)
                    tokens[b] = seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]
                elif fed.prefill:  # after the decode tokens [n, S] in _fed_tokens' flat index
                    src[b] = self.statics.decode_steps * self.num_slots + fed.index
                    fed_unsampled |= not had_pre
                else:
                    src[b] = fed.index * self.num_slots + b
                    fed_unsampled |= not had_dec
            tables = self._tables.update(batch.decodes)
            if fed_unsampled:
                raise RuntimeError("a decode row is fed a token the previous call did not sample")
            inputs = DecodeInputs(tokens=tokens, positions=positions, n_valid=n_valid,
                                  block_tables=tables, samp=batch.decode_sampling)
            # packed now: the launcher's thread may run while the next step rewrites the tables
            dec = (tokens, pack_decode_inputs(inputs), needs_filter(inputs.samp.temperature,
                   inputs.samp.top_p, inputs.samp.top_k), src if (src >= 0).any() else None)
        self.calls += (pre is not None) + (dec is not None)
        self._issued = (pre is not None, dec is not None)
        return self._launcher.submit(partial(self._launch, pre, dec))

    def _launch(self, pre, dec):
        """The step's device calls, in order (on the launcher's thread when it has one)."""
        last_pre, last_dec = self._last
        pre_out = self._prefill_call(*pre) if pre is not None else None
        dec_out = None
        if dec is not None:
            tokens, packed, filtered, src = dec
            if src is not None:
                no_dec, no_pre = self._no_tokens
                tokens = _fed_tokens(tokens, last_dec if last_dec is not None else no_dec,
                                     last_pre if last_pre is not None else no_pre, src)
            dec_out = self._decode_call(tokens, packed, filtered)
        self._last = tuple(out[0] if out is not None else None for out in (pre_out, dec_out))
        return pre_out, dec_out

    def fetch(self, handle) -> StepOutput:
        pre, dec = handle.result()  # issued (an error of the launch is raised here)
        host_pre, host_dec = jax.device_get((pre, dec))  # one sync per step
        out = StepOutput()
        if host_pre is not None:
            token, probs, taps = host_pre  # rows of the packed call; chunk c's results in row c
            out.prefill_tokens, out.prefill_probs, out.prefill_taps = token, probs, taps
        if host_dec is not None:
            out.decode_tokens = np.asarray(host_dec[0])
            out.decode_probs = np.asarray(host_dec[1]) if host_dec[1] is not None else None
        return out

    def _prefill_inputs(self, batch: StepBatch) -> tuple[PrefillInputs, bool]:
        t_row = self.prefill_row_tokens
        pieces = []  # (chunk index, start position, tokens)
        for c, ch in enumerate(batch.prefills):
            for k in range(0, len(ch.tokens), t_row):
                pieces.append((c, ch.start + k, ch.tokens[k:k + t_row]))
        need = len(pieces) * t_row
        cap = next((b for b in self.prefill_capacities if b >= need), None)
        if cap is None:
            raise ValueError(f"{need} padded prefill tokens exceed the packed call's "
                             f"{self.prefill_capacities[-1]}")
        r, ps = cap // t_row, self.page_size
        tokens, positions = np.zeros((r, t_row), np.int32), np.zeros((r, t_row), np.int32)
        slots = np.full((r, t_row), -1, np.int32)
        tables = np.zeros((r, self.max_pages_per_seq), np.int32)
        q_lens, row_chunk = np.zeros(r, np.int32), np.zeros(r, np.int32)
        last_row, n_prompt, chunk_end = (np.zeros(r, np.int32) for _ in range(3))
        for i, (c, start, toks) in enumerate(pieces):
            bt = batch.prefills[c].seq.block_table
            n = len(toks)
            tokens[i, :n], positions[i] = toks, np.arange(start, start + t_row)
            tables[i, :len(bt)] = bt
            p = np.arange(start, start + n)
            slots[i, :n] = tables[i, p // ps] * ps + p % ps
            q_lens[i], row_chunk[i], last_row[c] = n, c, i
        for c, ch in enumerate(batch.prefills):
            n_prompt[c], chunk_end[c] = ch.seq.num_prompt_tokens, ch.start + len(ch.tokens)
        # Host arrays only: an eager jnp op here (stack, slice, index) compiles once per new shape,
        # measured as ~4 s pauses mid-run on the H200 that no warm-up reaches.
        tap_in = np.zeros((r, self.cfg.d_model), np.float32)
        for c, ch in enumerate(batch.prefills):
            if ch.tap is not None:
                tap_in[c] = ch.tap
        samp = _pad_rows(batch.prefill_sampling, r)
        inputs = PrefillInputs(tokens=tokens, positions=positions, slot_mapping=slots.reshape(-1),
                               block_tables=tables, q_lens=q_lens, row_chunk=row_chunk, last_row=last_row,
                               n_prompt=n_prompt, chunk_end=chunk_end, tap_in=tap_in, samp=samp)
        # the running prompt-tap sums come back only when a prompt has chunks to come
        return inputs, any(not ch.completes for ch in batch.prefills)

    def _prefill_call(self, inputs: PrefillInputs, keep_taps: bool):
        self._caches, token, probs, tap_acc = _prefill_packed(
            self.statics, state=self._state_leaves, caches=self._caches, probe_state=self.probe_state,
            inputs=inputs)
        return token, probs, (tap_acc if keep_taps else None)

    def swap_out(self, pages: list[int]) -> swap.SwappedKV:
        return swap.swap_out(self.caches, pages)

    def swap_in(self, pages: list[int], saved: swap.SwappedKV) -> None:
        self._caches = swap.swap_in(self.caches, pages, saved)

    def warmup(self) -> None:
        """Compile the decode step ahead of traffic, with and without top-p/top-k (all rows empty:
        nothing is written)."""
        s = self.num_slots
        z = np.zeros(s, np.int32)
        tables = np.zeros((s, self.max_pages_per_seq), np.int32)
        forced = np.full((s, self.statics.decode_steps), -1, np.int32)
        for top_p in (1.0, 0.9):  # the second variant sorts the vocabulary (sample_tokens' filtered)
            samp = SamplingRows(np.ones(s, np.float32), np.full(s, top_p, np.float32), z, z.astype(np.uint32),
                                z, forced)
            inputs = DecodeInputs(tokens=z, positions=z, n_valid=z, block_tables=tables, samp=samp)
            for _ in self._ios:  # each decode executable in turn
                jax.block_until_ready(self.decode(inputs))

    # ---- the jitted steps ---------------------------------------------------------------------
    def decode(self, inputs: DecodeInputs):
        """One decode call of `decode_steps` steps over every slot. Returns device arrays tokens [n, S]
        and probs [n, S, K] or None; step j's token for slot b is at [j, b]."""
        samp = inputs.samp
        self._launcher.drain()
        return self._decode_call(inputs.tokens, pack_decode_inputs(inputs),
                                 needs_filter(samp.temperature, samp.top_p, samp.top_k))

    def _decode_call(self, tokens, packed: np.ndarray, filtered: bool):
        k = self._turn
        self._turn = (k + 1) % len(self._ios)
        io = _stage_decode(self._ios[k], tokens=tokens, packed=packed)
        self._caches, io = _DECODE_CALLS[k](
            self.statics, state=self._state_leaves, caches=self._caches, probe_state=self.probe_state,
            io=io, filtered=filtered)
        self._ios[k] = io
        out_tokens, out_probs = _collect_decode(io)
        return out_tokens, (out_probs if self.has_probe else None)
