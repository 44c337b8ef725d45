"""The batch description: what the engine's scheduler side decides for one step and the runner
executes (nano-vllm / vLLM v1 style). Plain numpy and `Sequence`s, no JAX, so a fake runner can
execute it with no model.

Prefill chunks (admitted requests' prompt chunks and probe-only prefills of waiting requests) and
decode rows (one per running, prefilled request, in its batch slot) make up one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..sequence import Sequence


class SamplingRows(NamedTuple):
    """Per-row sampling parameters; keys derive from (seed, index of the generated token), so a
    request's draws depend neither on its batch neighbours nor on preemption."""

    temperature: Any  # [B] f32
    top_p: Any  # [B] f32
    top_k: Any  # [B] int32
    seed: Any  # [B] uint32
    gen_index: Any  # [B] int32: number of tokens generated before this draw
    # [B, steps] int32: the token to emit at draw j instead of sampling (trace replay), -1 = sample
    forced: Any


# a row with no request (an empty slot, padding): greedy, top-p 1 (no vocabulary sort), nothing forced
EMPTY_ROW = SamplingRows(temperature=0.0, top_p=1.0, top_k=0, seed=0, gen_index=0, forced=-1)


@dataclass
class PrefillChunk:
    """KV for `tokens` at positions [start, start + len(tokens)) of `seq`; the runner samples the
    token after the last one and (with a probe) reports the prompt-mean probe output."""

    seq: Sequence
    start: int
    tokens: list[int]
    probe_only: bool = False  # a waiting request's prompt in borrowed pages: only its probe output counts
    tap: Any = None  # running prompt-tap sum of the sequence's earlier chunks (runner-owned value)
    # the chunk ends the sequence's prefill: its sampled token is the next output token (fixed when
    # the chunk is scheduled: under async scheduling the outputs of the step before may land later)
    completes: bool = field(init=False)

    def __post_init__(self) -> None:
        self.completes = not self.probe_only and self.start + len(self.tokens) == self.seq.num_tokens


class Fed(NamedTuple):
    """Async scheduling: where a decode row's input token is among the sampled tokens of the call
    still in flight (its device output, never fetched to the host for this)."""

    prefill: bool  # True: the token of prefill chunk `index`; False: decode step `index` of the row's slot
    index: int


@dataclass(slots=True)  # one per running request per step: slots make it cheap to build
class DecodeRow:
    seq: Sequence  # runs in its batch slot, seq.slot
    steps: int  # decode steps this row may take in the call (1..decode_steps_per_call)
    # async scheduling: tokens of this sequence sampled by the call in flight and not yet on the host
    # (the row's input is the last of them, at position seq.num_tokens - 1 + ahead); 0 when synchronous
    ahead: int = 0
    fed: Fed | None = None  # where that input token is (set when ahead > 0)
    slot: int = field(init=False)  # the batch slot at scheduling (a preemption later clears seq.slot)
    # position of the row's input token (the last token so far, counting those in flight), at
    # scheduling: the step's outputs are appended only after its runner call
    position: int = field(init=False)

    def __post_init__(self) -> None:
        self.slot = self.seq.slot
        self.position = self.seq.num_tokens - 1 + self.ahead


@dataclass
class StepBatch:
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_sampling: SamplingRows | None = None  # one row per chunk
    decodes: list[DecodeRow] = field(default_factory=list)
    decode_sampling: SamplingRows | None = None  # one row per batch slot

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes)


@dataclass
class StepOutput:
    """The runner's results on the host, fetched once per step."""

    prefill_tokens: np.ndarray | None = None  # [rows]: chunk c in row c (rows past the chunks: padding)
    prefill_probs: np.ndarray | None = None  # [rows, K] likewise (None without a probe)
    prefill_taps: Any = None  # host rows by chunk: new running prompt-tap sums (None: none kept)
    decode_tokens: np.ndarray | None = None  # [steps, num_slots]
    decode_probs: np.ndarray | None = None  # [steps, num_slots, K]


def prefill_layout(buckets: tuple[int, ...], max_tokens: int | None) -> tuple[int, tuple[int, ...]]:
    """(row length, capacities) of the packed prefill call. A chunk occupies ceil(len / row) rows of
    `row` = buckets[0] tokens; the call is padded to the smallest capacity that holds the step's rows.
    Capacities are the buckets below the step budget `max_tokens` plus the budget itself (rounded up
    to whole rows), so there are at most len(buckets) compilations."""
    row = buckets[0]
    top = max_tokens if max_tokens is not None else buckets[-1]

    def up(x: int) -> int:
        return -(-x // row) * row

    return row, tuple(sorted({up(b) for b in buckets[:-1] if b < top} | {up(top)}))


def padded_tokens(n: int, row: int) -> int:
    """Tokens a chunk of n tokens costs in the packed call (whole rows)."""
    return -(-n // row) * row
