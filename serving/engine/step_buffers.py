"""The jitted steps' per-call inputs and outputs in device buffers whose addresses never change.

XLA runs a step as one CUDA graph; when a buffer it touches moves, the graph is updated and the next
launch uploads it again (H200: ~1 ms of host time a call for SmolLM2's ~400 kernels, ENGINE_NOTES.md).
So every call donates its buffer set and gets it back: a small `_stage_*` program writes the step's host
inputs into it, the step writes its outputs into it, and `_collect_*` copies the outputs out, because a
later call donates the buffers while the host may still read the step's results (async scheduling).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["DecodeIO", "PrefillIO", "decode_buffers", "prefill_buffers"]


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


@partial(jax.jit, donate_argnames=("io", "pio"))
def _stage_mixed(io: DecodeIO, pio: PrefillIO, tokens, packed, prefill_packed) -> tuple[DecodeIO, PrefillIO]:
    """_stage_decode and _stage_prefill in one dispatch."""
    io = io._replace(tokens=io.tokens.at[:].set(tokens.astype(jnp.int32)), packed=io.packed.at[:].set(packed))
    return io, pio._replace(packed=pio.packed.at[:].set(prefill_packed))


@partial(jax.jit, static_argnames=("probs",))
def _collect_mixed(io: DecodeIO, pio: PrefillIO, probs: bool):
    """_collect_prefill's and _collect_decode's copies in one dispatch."""
    return _collect_prefill(pio, probs), (io.out_tokens + 0, io.out_probs + 0)


# Made on the device: a CPU device_put of numpy may share the host memory, which a call cannot take
# over (donate), so the first call would have moved them.
def decode_buffers(slots: int, width: int, steps: int, bins: int, on: Any) -> DecodeIO:
    """A decode (or mixed) call's buffers: `width` columns of pack_decode_inputs, `steps` tokens per
    call, `bins` probe bins (0: no probe), on sharding `on`."""
    return DecodeIO(tokens=jnp.zeros(slots, jnp.int32, device=on),
                    packed=jnp.zeros((slots, width), jnp.int32, device=on),
                    out_tokens=jnp.zeros((steps, slots), jnp.int32, device=on),
                    out_probs=jnp.zeros((steps, slots, max(bins, 1)), jnp.float32, device=on))


def prefill_buffers(rows: int, width: int, tap_width: int, bins: int, on: Any) -> PrefillIO:
    """A packed prefill (or mixed) call's buffers for `rows` rows of `width` packed columns."""
    return PrefillIO(packed=jnp.zeros((rows, width), jnp.int32, device=on),
                     out_tokens=jnp.zeros(rows, jnp.int32, device=on),
                     out_probs=jnp.zeros((rows, max(bins, 1)), jnp.float32, device=on),
                     out_taps=jnp.zeros((rows, tap_width), jnp.float32, device=on))
