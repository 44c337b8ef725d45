"""Request state shared by the engine, the scheduler policies, the simulator and the gRPC server.

Plain Python (no JAX): the scheduler reads and orders these objects, the engine (or the simulator)
advances them. One `Sequence` per request.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from ..models.errors import JtrailError


class InvalidRequestError(JtrailError, ValueError):
    """A request parameter is out of range; `field` names it (mapped to INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class QueueFullError(JtrailError):
    """The engine's waiting queue is full (mapped to RESOURCE_EXHAUSTED)."""


class RequestFailedError(JtrailError):
    """The engine failed while working on one request; that request alone ends (mapped to INTERNAL).
    Engine code that knows which request a failure belongs to raises it so only that one fails."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"request {request_id!r} failed in the engine: {message}")
        self.request_id = request_id


class EngineDeadError(JtrailError):
    """The engine loop has stopped for good; nothing more will be served (mapped to UNAVAILABLE)."""


# Limits on what one request may ask for. They bound the work a single request can cause on the
# engine thread (stop strings are searched in the decoded text after every token).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
SEED_RANGE = 2**32  # the sampler keys on a uint32 seed
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the sampler's dtype


def _int(name: str, v: object, lo: int, hi: int) -> int:
    """`v` as a Python int in [lo, hi]; bools and floats are refused (they are not counts)."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise InvalidRequestError(name, f"must be an integer, got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise InvalidRequestError(name, f"must be in [{lo}, {hi}], got {v!r}")
    return int(v)


def _float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        raise InvalidRequestError(name, f"must be a number, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise InvalidRequestError(name, f"must be finite, got {f!r}")
    return f


def check_priority(priority: object) -> int:
    """A request's priority (lower runs first) as an int32, as on the wire."""
    return _int("priority", priority, -_INT32_MAX - 1, _INT32_MAX)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # in [0, 2**32)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # forced-length benchmarks generate exactly max_tokens
    # Trace replay (teacher forcing): the engine emits these ids in order instead of sampling, then
    # finishes (STOP) after the last one; eos and stop strings are not checked (the given answer is
    # what is emitted), max_tokens still is. KV, hidden states and the probe see the given answer.
    forced_output_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Range- and type-check every field (the one trust boundary: the engine thread never sees a
        value it cannot cast), and normalize numpy scalars to Python numbers."""
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("max_tokens", _int("max_tokens", self.max_tokens, 1, _INT32_MAX))
        t = _float("temperature", self.temperature)
        if not 0.0 <= t <= _FLOAT32_MAX:
            raise InvalidRequestError("temperature", f"must be >= 0 (and a float32), got {t!r}")
        set_("temperature", t)
        p = _float("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {p!r}")
        set_("top_p", p)
        set_("top_k", _int("top_k", self.top_k, 0, _INT32_MAX))
        if self.seed is not None:
            set_("seed", _int("seed", self.seed, 0, SEED_RANGE - 1))
        if not isinstance(self.ignore_eos, bool | np.bool_):
            raise InvalidRequestError("ignore_eos", f"must be a bool, got {type(self.ignore_eos).__name__}")
        set_("ignore_eos", bool(self.ignore_eos))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise InvalidRequestError("stop", f"must be a list, not {type(stop).__name__}") from None
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"each stop string must be a non-empty str, got {s!r:.80}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError("stop", f"each stop string must be at most {MAX_STOP_STRING_CHARS} "
                                                  f"characters, got {len(s)}")
        set_("stop", stop)
        try:
            ids = tuple(self.stop_token_ids)
        except TypeError:
            raise InvalidRequestError("stop_token_ids", "must be a list of token ids") from None
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        set_("stop_token_ids", tuple(_int("stop_token_ids", t, 0, _INT32_MAX) for t in ids))
        try:
            forced = tuple(self.forced_output_ids)
        except TypeError:
            raise InvalidRequestError("forced_output_ids", "must be a list of token ids") from None
        set_("forced_output_ids", tuple(_int("forced_output_ids", t, 0, _INT32_MAX) for t in forced))

    def stop_index(self, text: str) -> int | None:
        """Where the answer ends in `text`: the start of the earliest stop string, or None."""
        hits = [text.find(s) for s in self.stop if s and s in text]
        return min(hits) if hits else None


class Status(enum.Enum):
    WAITING = "waiting"  # never run, or preempted and waiting to resume
    RUNNING = "running"  # holds a batch slot and KV pages
    SWAPPED = "swapped"  # preempted with its KV kept: in host memory (swap) or its own device pages (keep)
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, stop string or stop token
    LENGTH = "length"  # max_tokens or context limit
    CANCELLED = "cancelled"
    ERROR = "error"

    def __str__(self) -> str:  # prints as vLLM/OpenAI spell it: "stop", "length"
        return self.value


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
    def oracle_remaining(self) -> int | None:
        if self.oracle_remaining_at_start is None:
            return None
        return max(self.oracle_remaining_at_start - self.num_generated, 0)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED



@dataclass(slots=True)  # one per request per step
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
