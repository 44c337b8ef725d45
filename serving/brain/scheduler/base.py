"""The scheduler interface: one object decides, each engine step, what is admitted and preempted.

Plain Python over `Sequence` state, no JAX: the real engine and the simulator run the very same
policy objects. The engine calls `schedule()` once per step with a snapshot of its resources, applies
the preemptions, then admits in the order given while slots and pages allow (it re-checks), and
calls `choose_victim()` when a running sequence needs a page that is not free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ...sequence import Sequence


@dataclass
class SchedulerState:
    waiting: list[Sequence]  # waiting (new or preempted-by-recompute) and swapped, in arrival order
    running: list[Sequence]  # hold a batch slot, in admission order
    free_slots: int
    free_pages: int
    total_pages: int
    page_size: int
    now: float
    # steps run so far, only where every running sequence gains one token per step (the simulator):
    # lets policies keep the running sequences' rank order incrementally (scheduler/runindex.py)
    step: int | None = None


@dataclass
class PolicyStats:
    """Counts a policy keeps of its own decisions (the simulator reports them per replica)."""

    schedule_calls: int = 0
    admissions_proposed: int = 0
    preemptions: int = 0  # decided in schedule()
    victims: int = 0  # chosen in choose_victim() when memory ran out


@dataclass
class Decision:
    preempt: list[Sequence] = field(default_factory=list)  # running -> waiting
    admit: list[Sequence] = field(default_factory=list)  # waiting -> running, in this order


class Policy(ABC):
    """Base class of scheduling policies. Subclasses set `name` and implement `schedule`."""

    name: str = "base"
    # Ranks waiting requests by predicted length: the engine runs a probe-only prefill for requests
    # that must wait for a slot, so they have a prediction to be ranked by (engine._probe_waiting).
    probe_on_arrival: bool = False
    # Where that first estimate comes from: "probe" (the probe-only prefill) or "host" (the engine's
    # prompt estimator at add_request, no device time; `trail`'s option).
    arrival_estimate: str = "probe"
    # How long (s) probe-only prefills may wait for a step that already makes a prefill call (an
    # admitted prompt's), where they ride almost free: on the H200 a step with a prefill call costs ~2 ms
    # more than a decode-only step, a further chunk in it almost nothing. 0: each waiting request is
    # probed in the next step (one extra prefill call per such step). `trail`'s option.
    probe_hold_s: float = 0.0
    # Ranks by remaining length, which falls one per generated token (the router's slot forecast
    # then drops long queued requests from what a new arrival waits behind).
    counts_down: bool = False
    # Counts of this policy's decisions; None where a policy keeps none (the simple ones).
    stats: PolicyStats | None = None

    @abstractmethod
    def schedule(self, state: SchedulerState) -> Decision: ...

    def choose_victim(self, running: list[Sequence], now: float) -> Sequence:
        """The running sequence to preempt when memory runs out (vLLM: the most recently admitted)."""
        return max(running, key=lambda s: (s.admitted_time or 0.0, s.arrival_time))

    def on_arrival(self, seq: Sequence, now: float) -> None:  # noqa: B027 - optional hook
        """Called once when a request enters the waiting queue."""

    def on_finish(self, seq: Sequence, now: float) -> None:  # noqa: B027 - optional hook
        """Called once when a request finishes or is cancelled."""

    def on_estimate(self, seq: Sequence) -> None:  # noqa: B027 - optional hook
        """Called when a waiting request's length estimate arrives (its probe-only prefill's)."""

    def on_preemption_mode(self, mode: str) -> None:  # noqa: B027 - optional hook
        """Called once by the engine (or a simulated replica) that runs this policy, with what its
        preemptions do to the KV (EngineConfig.preemption_mode): a policy may tune itself to it."""


def kept_victim(kept: list[Sequence]) -> Sequence:
    """Of the requests preempted with their KV kept in device pages ("keep"), the one whose pages go first
    when pages run out: the longest estimated remaining (it would resume last), then the latest arrival."""
    return max(kept, key=lambda s: (s.predicted_remaining if s.predicted_remaining is not None
                                    else s.max_remaining, s.arrival_time))
