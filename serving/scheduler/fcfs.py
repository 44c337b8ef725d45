"""First-come-first-served (vLLM's default): admit in arrival order, never preempt in `schedule`.

When memory runs out the engine asks `choose_victim`, which (base class) preempts the most recently
admitted request. Preempted requests keep their arrival time, so they resume before newer ones.
"""

from __future__ import annotations

from .base import Decision, Policy, SchedulerState


class FCFSPolicy(Policy):
    name = "fcfs"

    def schedule(self, state: SchedulerState) -> Decision:
        queue = sorted(state.waiting, key=lambda s: (s.arrival_time, s.request_id))
        return Decision(admit=queue[: state.free_slots])
