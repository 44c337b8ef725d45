"""Request state shared by the engine, the scheduler policies, the simulator and the gRPC server.

Plain Python (no JAX): the scheduler reads and orders these objects, the engine (or the simulator)
advances them. One `Sequence` per request.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np


class JtrailError(Exception):
    """Base class of the library's typed errors."""


class InvalidRequestError(JtrailError, ValueError):
    """A request parameter is out of range; `field` names it (mapped to INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class QueueFullError(JtrailError):
    """The engine's waiting queue is full (mapped to RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # forced-length benchmarks generate exactly max_tokens
    # Trace replay (teacher forcing): the engine emits these ids in order instead of sampling, then
    # finishes (STOP) after the last one; eos and stop strings are not checked (the given answer is
    # what is emitted), max_tokens still is. KV, hidden states and the probe see the given answer.
    forced_output_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0, got {self.top_k!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        forced = tuple(self.forced_output_ids)
        if any(isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0 for t in forced):
            raise InvalidRequestError("forced_output_ids", "must be non-negative integer token ids")
        object.__setattr__(self, "forced_output_ids", tuple(int(t) for t in forced))

    def stop_index(self, text: str) -> int | None:
        """Where the answer ends in `text`: the start of the earliest stop string, or None."""
        hits = [text.find(s) for s in self.stop if s and s in text]
        return min(hits) if hits else None


class Status(enum.Enum):
    WAITING = "waiting"  # never run, or preempted and waiting to resume
    RUNNING = "running"  # holds a batch slot and KV pages
    SWAPPED = "swapped"  # preempted by swap: its pages live in host memory
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, stop string or stop token
    LENGTH = "length"  # max_tokens or context limit
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower value runs first (vLLM's convention)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None

    # KV state (owned by the engine; the scheduler only reads it)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (prefill may be chunked)
    slot: int | None = None

    # Length prediction (written by the predictor, read by policies)
    initial_prediction: float | None = None  # first estimate of the output length (at prefill)
    predicted_remaining: float | None = None  # current estimate of tokens still to generate
    posterior: np.ndarray | None = None  # posterior over remaining-length bins
    tokens_since_refinement: int = 0
    prediction_epoch: int = 0  # bumped by predictors on a new estimate (not on the count-down)
    oracle_remaining_at_start: int | None = None  # true output length, known only to srpt-oracle / sims

    # Accounting
    admitted_time: float | None = None  # last time it got a batch slot
    first_admitted_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def max_remaining(self) -> int:
        return self.params.max_tokens - self.num_generated

    def forced_token(self, index: int) -> int:
        """The given output token at output position `index`, or -1 (sample it)."""
        forced = self.params.forced_output_ids
        return forced[index] if index < len(forced) else -1

    @property
    def forced_remaining(self) -> int | None:
        """Tokens left of a replayed answer (None when the request samples freely)."""
        forced = self.params.forced_output_ids
        return len(forced) - self.num_generated if forced else None

    @property
    def oracle_remaining(self) -> int | None:
        if self.oracle_remaining_at_start is None:
            return None
        return max(self.oracle_remaining_at_start - self.num_generated, 0)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def pages_needed(self, page_size: int, extra_tokens: int = 0) -> int:
        """Pages to hold every token so far plus `extra_tokens` more."""
        return -(-(self.num_tokens + extra_tokens) // page_size)


@dataclass
class RequestOutput:
    """One streamed update for a request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    remaining_estimate: float | None = None
    error: str | None = None
