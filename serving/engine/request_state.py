"""The engine's per-request record: everything the engine keeps about one request besides the
scheduler-visible `Sequence` (which the policies, the simulator and the predictor share)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..sequence import Sequence, Status
from .batch import StepBatch
from .detokenizer import ByteLevelDetokenizer, IncrementalDetokenizer
from .stop_rule import StopRule


@dataclass(eq=False)
class EngineRequest:
    seq: Sequence
    detok: IncrementalDetokenizer | ByteLevelDetokenizer
    seed: int  # the request's sampling seed (its own, or drawn from the engine's generator)
    stop: StopRule  # its stop rules, resolved once
    prefilled: bool = False  # KV covers all but the last token: the request decodes
    tap: Any = None  # running prompt-tap sum while its prefill is split over steps (runner value)
    swapped: Any = None  # host copy of its KV while preempted by swap (runner value)
    # Async scheduling (a step in flight while the next is scheduled): `ahead` counts its tokens
    # sampled by calls in flight and not yet appended; `in_flight` its work items (prefill chunk,
    # probe-only prefill, decode row) in calls not yet processed, whose results a new prefill, the
    # next chunk (its prompt-tap sum) or another probe needs first. Both are 0 after a synchronous step.
    ahead: int = 0
    in_flight: int = 0


def lose_results(batches: Iterable[StepBatch | None], reqs: dict[str, EngineRequest]) -> set[str]:
    """A failed step: the results of its batch and of every batch still in flight are lost. Returns
    the requests (prompt-only probes aside) that can no longer be trusted, for the front end to fail;
    every request's in-flight counts start again from zero. One the front end keeps (it may fail only
    the request the error names) restarts as after a recompute preemption: its KV progress counted the
    lost calls, whose writes are unknown (a swap copy or a page count made from that progress would
    not match the tokens kept)."""
    lost = set()
    for b in batches:
        if b is None:
            continue
        for seq in [c.seq for c in b.prefills if not c.probe_only] + [r.seq for r in b.decodes]:
            if not seq.is_finished:
                lost.add(seq.request_id)
    for st in reqs.values():
        st.ahead = st.in_flight = 0
        seq = st.seq
        if seq.request_id not in lost or seq.is_finished:
            continue
        seq.num_computed_tokens, st.prefilled, st.tap = 0, False, None
        st.swapped = None  # a host copy holds the lost calls' pages: recompute instead
        if seq.status is Status.SWAPPED:  # (under "keep" it keeps its pages, rewritten from the start)
            seq.status = Status.WAITING
    return lost
