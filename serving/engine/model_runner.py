"""The JAX runner: the paged KV cache, the step's host inputs, and calls of the jitted steps
(step_programs.py), issued in order by a `Launcher`.

The cache is a list (one per layer) of (k_pages, v_pages), each [Hkv, num_pages, page_size, D],
donated through every jitted call so XLA updates it in place. Shapes are static: decode always runs
all `num_slots` rows for `decode_steps` steps; prefill runs every chunk of the step in one packed
call padded to one of at most len(prefill_buckets) capacities (batch.prefill_layout). With mixed steps
(one token per decode call) a step that prefills runs its chunks and its decode rows in that one call
(step_programs._mixed_program); otherwise a prefill call, then a decode call. Compilations: per
capacity and compiled copy (prefill_graphs) the prefill or mixed step (mixed: also a variant that
sorts the vocabulary), and the decode step per copy (decode_graphs) and variant (+ swap buckets).

Each call returns sampled tokens and, when a probe is loaded, the probe's bin probabilities computed
in the same graph from the tap (hidden state after `probe.cfg.layer`). With no probe, tap_layer is
None and the probe code is not traced at all.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ...models.llama import Llama
from ...models.probe import ProbeHead
from ...models.sampling import needs_filter
from ...models.sharding import kv_sharding, make_mesh, shard_model
from ..paging import pages_for
from . import swap
from .batch import SamplingRows, StepBatch, StepOutput, prefill_layout
from .launcher import Launcher
from .slot_rows import SlotTables
from .step_buffers import (
    _collect_decode,
    _collect_mixed,
    _collect_prefill,
    _stage_decode,
    _stage_mixed,
    _stage_prefill,
    decode_buffers,
    prefill_buffers,
)
from .step_inputs import DecodeInputs, PrefillLayout, pack_decode_inputs, prefill_call_inputs
from .step_programs import (
    _DECODE_CALLS,
    _DECODE_CALLS_CUBLAS,
    _MIXED_CALLS,
    _PREFILL_CALLS,
    TRACE_COUNTS,
    StepStatics,
    _fed_tokens,
    check_rope_in_kernel,
    intern_statics,
)

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(self, model: Llama, *, num_slots: int, num_pages: int, page_size: int,
                 max_model_len: int, decode_steps: int = 1, kv_dtype: Any = None, impl: str = "auto",
                 probe: ProbeHead | None = None, tensor_parallel: int = 1,
                 prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512),
                 max_prefill_tokens: int | None = None, decode_graphs: int = 1, prefill_graphs: int = 1,
                 launch_thread: bool = False, poll_fetch: bool = False, mixed_steps: bool = False,
                 rope_in_kernel: bool = False, decode_gemms: str = "xla"):
        """`decode_graphs` 2 or 3: consecutive decode calls rotate over that many compiled copies of the
        step, each with its own DecodeIO. Under async scheduling call N is dispatched while N-1 runs, so
        XLA's temporary buffers of one executable alternate between two addresses and its CUDA graph is
        updated on every call; with one executable per call in flight each may find its own at the same
        place again. `prefill_graphs`: likewise for each capacity of the packed prefill call.
        (EngineConfig checks the values.) `launch_thread`: the device calls are issued from a thread of
        their own (launcher.Launcher), so a call's launch overlaps the engine's host work. `poll_fetch`:
        a step's outputs start their copy to the host as soon as the step is launched, and `fetch`
        polls their readiness instead of blocking in the transfer (see EngineConfig.poll_fetch).
        `mixed_steps` (one token per decode call only): a step with prefill chunks runs them and its
        decode rows in one forward (see EngineConfig.mixed_steps). `rope_in_kernel`: decode steps rotate,
        write K/V and attend in one kernel a layer (see EngineConfig.rope_in_kernel). `decode_gemms`
        "cublas": the decode call is compiled with XLA's Triton GEMMs off (see EngineConfig.decode_gemms)."""
        cfg = model.cfg
        check_rope_in_kernel(impl, rope_in_kernel)  # here, not at the first step's trace
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
        self._tokens_on = tokens_on
        self._launcher = Launcher(launch_thread)
        self.poll_fetch = poll_fetch
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
        self._prefill_layout = PrefillLayout(self.prefill_row_tokens, self.max_pages_per_seq,
                                             cfg.d_model if probe is not None else 0)
        self._last: tuple[Any, Any] = (None, None)  # the last call's sampled tokens (prefill, decode)
        self._issued = (False, False)  # whether the last execute had prefill chunks, decode rows
        width = 7 + self.max_pages_per_seq + decode_steps  # pack_decode_inputs' columns
        # the calls' fixed-address inputs and outputs (step_buffers.py): per decode copy; per prefill
        # capacity (rows) and copy; with mixed steps (a step's prefill chunks and decode rows in one
        # forward; one token per decode call only) decode buffers of their own per prefill set, so every
        # compiled copy of every step always finds the same buffers
        self._ios = [decode_buffers(num_slots, width, decode_steps, bins, tokens_on)
                     for _ in range(decode_graphs)]
        self._turn = 0  # which decode executable (and its DecodeIO) the next call uses
        self._decode_calls = _DECODE_CALLS_CUBLAS if decode_gemms == "cublas" else _DECODE_CALLS
        layout = self._prefill_layout
        self._prefill_ios = {cap // layout.row_tokens: [
            prefill_buffers(cap // layout.row_tokens, layout.width, layout.tap_width, bins, tokens_on)
            for _ in range(prefill_graphs)] for cap in self.prefill_capacities}
        self._prefill_turn = dict.fromkeys(self._prefill_ios, 0)
        self.mixed_steps = mixed_steps and decode_steps == 1
        self._mixed_ios = {rows: [decode_buffers(num_slots, width, 1, bins, tokens_on) for _ in ios]
                           for rows, ios in self._prefill_ios.items()} if self.mixed_steps else {}
        empty = np.zeros(num_slots, np.int32)  # a mixed step with no decode rows: every row empty
        samp = SamplingRows(np.zeros(num_slots, np.float32), np.ones(num_slots, np.float32), empty,
                            empty.astype(np.uint32), empty, np.full((num_slots, 1), -1, np.int32))
        tables = np.zeros((num_slots, self.max_pages_per_seq), np.int32)
        no_rows = DecodeInputs(tokens=empty, positions=empty, n_valid=empty, block_tables=tables, samp=samp)
        self._no_decode_rows = (jax.device_put(empty, tokens_on), pack_decode_inputs(no_rows), False, None)
        self.statics = intern_statics(StepStatics(graphdef, probe_graphdef, layer, page_size, decode_steps,
                                                  impl, bins, mesh, treedef,
                                                  rope_in_kernel=rope_in_kernel and mesh is None))

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
    def prefill_graphs(self) -> int:
        """How many compiled copies of the prefill step (per capacity) the calls rotate over."""
        return len(next(iter(self._prefill_ios.values())))

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
        return {k: TRACE_COUNTS[k, self.statics] for k in ("prefill", "decode", "mixed")}

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
        mixed = self.mixed_steps and pre is not None
        self.calls += 1 if mixed else (pre is not None) + (dec is not None)
        self._issued = (pre is not None, dec is not None)
        return self._launcher.submit(partial(self._launch, pre, dec, mixed))

    def _launch(self, pre, dec, mixed: bool = False):
        """The step's device calls, in order (on the launcher's thread when it has one)."""
        last_pre, last_dec = self._last
        if dec is not None:
            tokens, packed, filtered, src = dec
            if src is not None:  # rows fed tokens of the call in flight
                no_dec, no_pre = self._no_tokens
                tokens = _fed_tokens(tokens, last_dec if last_dec is not None else no_dec,
                                     last_pre if last_pre is not None else no_pre, src)
            else:  # committed, as _fed_tokens' output is: one compiled staging program, not two
                tokens = jax.device_put(tokens, self._tokens_on)
            dec = (tokens, packed, filtered, src)
        if mixed:
            pre_out, dec_out = self._mixed_call(pre, dec)
        else:
            pre_out = self._prefill_call(*pre[:3]) if pre is not None else None
            dec_out = self._decode_call(*dec[:3]) if dec is not None else None
        self._last = tuple(out[0] if out is not None else None for out in (pre_out, dec_out))
        if self.poll_fetch:  # the device copies the outputs to the host right after the step
            for out in jax.tree_util.tree_leaves((pre_out, dec_out)):
                out.copy_to_host_async()
        return pre_out, dec_out

    def fetch(self, handle) -> StepOutput:
        pre, dec = handle.result()  # issued (an error of the launch is raised here)
        if self.poll_fetch:
            outs = jax.tree_util.tree_leaves((pre, dec))
            while not all(out.is_ready() for out in outs):
                time.sleep(0)  # let the launcher's thread run
        host_pre, host_dec = jax.device_get((pre, dec))  # one sync per step
        out = StepOutput()
        if host_pre is not None:
            token, probs, taps = host_pre  # rows of the packed call; chunk c's results in row c
            out.prefill_tokens, out.prefill_probs, out.prefill_taps = token, probs, taps
        if host_dec is not None:
            out.decode_tokens = np.asarray(host_dec[0])
            out.decode_probs = np.asarray(host_dec[1]) if host_dec[1] is not None else None
        return out

    def _prefill_inputs(self, batch: StepBatch) -> tuple[np.ndarray, PrefillLayout, bool, bool]:
        return prefill_call_inputs(batch, self._prefill_layout, self.prefill_capacities, self.has_probe)

    def _prefill_call(self, packed: np.ndarray, layout: PrefillLayout, keep_taps: bool):
        rows = packed.shape[0]
        ios, k = self._prefill_ios[rows], self._prefill_turn[rows]
        self._prefill_turn[rows] = (k + 1) % len(ios)
        io = _stage_prefill(ios[k], packed)
        self._caches, ios[k] = _PREFILL_CALLS[k](
            self.statics, state=self._state_leaves, caches=self._caches, probe_state=self.probe_state,
            io=io, layout=layout)
        token, probs, taps = _collect_prefill(ios[k], probs=self.has_probe)
        return token, probs, (taps if keep_taps else None)

    def _mixed_call(self, pre, dec):
        """A step's prefill chunks and decode rows in one forward (_mixed_program): per capacity its
        compiled copies in turn, each with its own fixed-address buffers. -> (prefill, decode) outputs
        as _prefill_call's and _decode_call's (decode None when the step has no decode rows)."""
        packed, layout, keep_taps, pre_filtered = pre
        tokens, dec_packed, dec_filtered, _ = dec if dec is not None else self._no_decode_rows
        rows = packed.shape[0]
        k = self._prefill_turn[rows]
        self._prefill_turn[rows] = (k + 1) % len(self._prefill_ios[rows])
        io, pio = _stage_mixed(self._mixed_ios[rows][k], self._prefill_ios[rows][k], tokens, dec_packed,
                               packed)
        self._caches, io, pio = _MIXED_CALLS[k](
            self.statics, state=self._state_leaves, caches=self._caches, probe_state=self.probe_state,
            io=io, pio=pio, layout=layout, filtered=bool(pre_filtered or dec_filtered))
        self._mixed_ios[rows][k], self._prefill_ios[rows][k] = io, pio
        (token, probs, taps), (out_tokens, out_probs) = _collect_mixed(io, pio, probs=self.has_probe)
        pre_out = (token, probs, taps if keep_taps else None)
        return pre_out, ((out_tokens, out_probs if self.has_probe else None) if dec is not None else None)

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
        self._caches, io = self._decode_calls[k](
            self.statics, state=self._state_leaves, caches=self._caches, probe_state=self.probe_state,
            io=io, filtered=filtered)
        self._ios[k] = io
        out_tokens, out_probs = _collect_decode(io)
        return out_tokens, (out_probs if self.has_probe else None)
