"""A regime's trace as the engine ran it, with the probe outputs recorded along every answer, on disk.

`benchmarks/serving.py` writes one per regime (`$OUT/trace_<regime>.npz`). Replay decoding makes the
probe's outputs a function of the request alone (the tokens are given), so one engine run records
what every policy would see, and the simulator can replay the trace offline under any policy settings
(`benchmarks/tune_recorded.py` tunes trail this way on the tuning split, never on the benchmark's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jtrail.serving.simulation.simulator import Resources, Trace


@dataclass
class RecordedTrace:
    request_ids: list[str]
    arrival: np.ndarray  # s from the run's start
    prompt_len: np.ndarray
    output_len: np.ndarray  # the recorded answers' lengths (forced)
    max_tokens: int | None  # the cap each request was sent with
    records: dict[str, np.ndarray]  # request id -> [n+1, K] probe outputs (RecordedPredictor's rows)
    resources: Resources
    steps_in_flight: int
    split: str

    def trace(self, arrival: np.ndarray | None = None) -> Trace:
        """The trace (its own arrivals, or `arrival`: the same requests at other times)."""
        n = len(self.request_ids)
        caps = None if self.max_tokens is None else np.full(n, self.max_tokens)
        return Trace(self.arrival if arrival is None else np.asarray(arrival, float), self.prompt_len,
                     self.output_len, request_ids=list(self.request_ids), max_tokens=caps)


def save_recorded_trace(path: Path, wl: Any, records: dict[str, np.ndarray], *, slots: int, pages: int,
                        page_size: int, preemption_mode: str, steps_in_flight: int, split: str = "") -> None:
    """`wl`: the run's `loadgen.Workload`; `records`: `RecordingPredictor.records(...)`."""
    ids = list(wl.request_ids)
    rows = [np.asarray(records[r], np.float32) for r in ids]
    offsets = np.cumsum([0, *(len(r) for r in rows)])
    np.savez_compressed(
        path, request_ids=np.asarray(ids, str), arrival=np.asarray(wl.arrival, float),
        prompt_len=np.array([len(p) for p in wl.prompts], np.int64), output_len=np.asarray(wl.output_len),
        max_tokens=np.int64(-1 if wl.max_tokens is None else wl.max_tokens),
        record_rows=np.concatenate(rows), record_offsets=offsets.astype(np.int64),
        slots=np.int64(slots), pages=np.int64(pages), page_size=np.int64(page_size),
        preemption_mode=np.asarray(preemption_mode), steps_in_flight=np.int64(steps_in_flight),
        split=np.asarray(split))


def load_recorded_trace(path: str | Path) -> RecordedTrace:
    with np.load(path) as z:
        ids = [str(x) for x in z["request_ids"]]
        rows, off = z["record_rows"].astype(np.float64), z["record_offsets"]
        cap = int(z["max_tokens"])
        return RecordedTrace(
            ids, z["arrival"].astype(float), z["prompt_len"].astype(np.int64),
            z["output_len"].astype(np.int64),
            None if cap < 0 else cap, {r: rows[off[i]:off[i + 1]] for i, r in enumerate(ids)},
            Resources(num_slots=int(z["slots"]), num_pages=int(z["pages"]), page_size=int(z["page_size"]),
                      preemption=str(z["preemption_mode"])),
            int(z["steps_in_flight"]), str(z["split"]))
