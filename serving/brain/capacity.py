"""Serving capacity measured right: sustained output tokens/s while the batch is full, per request.

    capacity (req/s) = (output tokens / s over the steps where the batch was full)
                       / (mean output tokens per request of the workload)

Why not "requests done / makespan" of a run with everything sent at t=0: that figure mixes in the
ramp and, above all, the drain, where the batch empties one request at a time while the longest
answers finish; on heavy-tailed answer lengths it understated the H200 engine's capacity about
threefold (5.4 req/s against a sustained 14-15). Counting only full-batch steps measures what the
server does when it has work queued, which is what a load fraction should be a fraction of.

Input, one row per engine step (or per run of steps of a fixed batch, as the simulator records):
- `end_time`  [S] seconds, non-decreasing: when the step ended (any origin);
- `running`   [S] sequences in the step's batch (slots in use);
- `tokens_out`[S] output tokens the step produced (decode rows x tokens per row + first tokens);
- `seconds`   [S] optional, the step's own duration; without it row i lasts end_time[i] -
  end_time[i-1] (host time between steps included, which is right for a sustained rate) and row 0
  is dropped;
- `waiting`   [S] optional, requests waiting for a slot when the step was scheduled;
- `steps`     [S] optional, engine steps a row covers (default 1; informational).
A row counts as full when running >= num_slots, or, with `backlog=True` and `waiting` given, when
requests were waiting (a memory-bound server never fills its slots but is still saturated).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..sequence import InvalidRequestError


@dataclass
class StepRecord:
    end_time: np.ndarray
    running: np.ndarray
    tokens_out: np.ndarray
    seconds: np.ndarray | None = None
    waiting: np.ndarray | None = None
    steps: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.end_time = np.asarray(self.end_time, dtype=np.float64).reshape(-1)
        n = len(self.end_time)
        for name in ("running", "tokens_out", "seconds", "waiting", "steps"):
            v = getattr(self, name)
            if v is None:
                continue
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            if v.shape != (n,):
                raise InvalidRequestError(name, f"needs {n} values (one per step), got {v.shape[0]}")
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise InvalidRequestError(name, "must be finite and >= 0")
            setattr(self, name, v)
        if not np.all(np.isfinite(self.end_time)) or np.any(np.diff(self.end_time) < 0):
            raise InvalidRequestError("end_time", "must be finite and non-decreasing")

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[float, float, int, int, int, int]] | None) -> StepRecord:
        """The simulator's rows: (end time, seconds, steps, running, waiting, tokens out)."""
        a = np.asarray(list(rows or []), dtype=np.float64).reshape(-1, 6)
        return cls(end_time=a[:, 0], seconds=a[:, 1], steps=a[:, 2], running=a[:, 3], waiting=a[:, 4],
                   tokens_out=a[:, 5])

    def durations(self) -> np.ndarray:
        if self.seconds is not None:
            return self.seconds
        d = np.diff(self.end_time, prepend=np.nan)
        return d  # row 0: NaN (unknown start), dropped by the callers


PAUSE_FACTOR, PAUSE_MIN_S = 20.0, 1.0


def pauses(seconds: np.ndarray, factor: float = PAUSE_FACTOR, min_s: float = PAUSE_MIN_S) -> np.ndarray:
    """Steps that are one-time pauses (an XLA compile: ~4 s on the H200 against ~6 ms steps), not the
    engine's steady cost: longer than `factor` x the median step and than `min_s` (a long prefill
    step, ~0.1 s, is work). The one rule for capacity, the step-model fit and the runs' stall counts."""
    seconds = np.asarray(seconds, dtype=np.float64)
    if not len(seconds) or factor <= 0:
        return np.zeros(len(seconds), dtype=bool)
    return seconds > max(factor * float(np.nanmedian(seconds)), min_s)


def full_batch_throughput(rec: StepRecord, num_slots: int, *, backlog: bool = False,
                          min_seconds: float = 0.0, stall_factor: float = PAUSE_FACTOR) -> dict[str, float]:
    """Output tokens/s over the full-batch rows, with the time and share of rows that counted.

    Full-batch rows that are `pauses` (`stall_factor` x their median; 0: keep all) are not sustained
    throughput: left out, time and tokens, and counted in `stalls_excluded`. Without this, four
    compiles in a 25 s window put capacity at a quarter of what the engine sustains."""
    if num_slots < 1:
        raise InvalidRequestError("num_slots", f"must be >= 1, got {num_slots}")
    full = rec.running >= num_slots
    if backlog:
        if rec.waiting is None:
            raise InvalidRequestError("waiting", "backlog=True needs the waiting counts")
        full |= (rec.waiting > 0) & (rec.running > 0)
    dur = rec.durations()
    full &= np.isfinite(dur)
    stall = np.zeros_like(full)
    stall[full] = pauses(dur[full], stall_factor)
    full &= ~stall
    secs = float(dur[full].sum())
    if secs <= 0 or secs < min_seconds:
        raise InvalidRequestError("steps", f"only {secs:.3g} s of full-batch steps (need > {min_seconds} s): "
                                           "send more load or pass backlog=True with waiting counts")
    tokens = float(rec.tokens_out[full].sum())
    return {"tokens_per_s": tokens / secs, "full_seconds": secs, "full_rows": float(full.sum()),
            "rows": float(len(full)), "mean_running": float(rec.running[full].mean()),
            "stalls_excluded": float(stall.sum()), "stall_seconds": float(dur[stall].sum())}


def capacity_req_s(rec: StepRecord, num_slots: int, mean_output_tokens: float, *,
                   backlog: bool = False, min_seconds: float = 0.0) -> float:
    """Sustained request rate: full-batch output tokens/s / mean output tokens per request."""
    if not mean_output_tokens > 0:
        raise InvalidRequestError("mean_output_tokens", f"must be > 0, got {mean_output_tokens!r}")
    tp = full_batch_throughput(rec, num_slots, backlog=backlog, min_seconds=min_seconds)
    return tp["tokens_per_s"] / float(mean_output_tokens)
