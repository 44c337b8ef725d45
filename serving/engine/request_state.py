"""The engine's per-request record: everything the engine keeps about one request besides the
scheduler-visible `Sequence` (which the policies, the simulator and the predictor share)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sequence import Sequence
from .detokenizer import IncrementalDetokenizer
from .stop_rule import StopRule


@dataclass(eq=False)
class EngineRequest:
    seq: Sequence
    detok: IncrementalDetokenizer
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
