"""Running sequences by rank (largest first) for the preemption check, in O(log n) per query.

Only where every running sequence gains one token per step (the simulator passes
`SchedulerState.step`): estimates count down one per token, so `rank + step` stays fixed for every
running sequence between refinements, and the order only changes when one is refined (predictors
bump `Sequence.prediction_epoch`) or the running set changes. A C-speed comparison with the last
running list and its epoch sum tells which: new sequences are pushed, a refinement rebuilds (the
list itself is compared, not a sum of ids: a finished sequence's id can be reused by a new object).
Preemptibility (generated <= c x initial) never comes back once lost, so lost ones are retired.
Entries are validated when they reach the top (an estimate floored at 0 is re-filed there).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from operator import attrgetter

from ...sequence import Sequence, Status

_epoch = attrgetter("prediction_epoch")


class RunIndex:
    def __init__(self, rank: Callable[[Sequence], float], preemptible: Callable[[Sequence], bool],
                 counts_down: bool = True):
        self.rank, self.preemptible, self.counts_down = rank, preemptible, counts_down
        self.step = 0
        # (-key, -arrival, request_id, seq): ties go to the latest arrival, independent of history
        self._heap: list[tuple[float, float, str, Sequence]] = []
        self._known: set[Sequence] = set()  # sequences with a live entry
        self._epoch_at_push: dict[Sequence, int] = {}
        self._retired: set[Sequence] = set()  # past their preemption cutoff
        self._last: list[Sequence] = []  # the running list at the last sync (holds the objects, so
        self._epochs = 0  # a freed sequence's id cannot be reused by a new one unnoticed)

    def key(self, s: Sequence) -> float:
        return self.rank(s) + self.step if self.counts_down else self.rank(s)

    def _push(self, s: Sequence) -> None:
        self._known.add(s)
        self._epoch_at_push[s] = s.prediction_epoch
        heapq.heappush(self._heap, (-self.key(s), -s.arrival_time, s.request_id, s))

    def _sync(self, running: list[Sequence]) -> None:
        epochs = sum(map(_epoch, running))
        if epochs == self._epochs and running == self._last:  # C-speed identity comparison
            return
        if len(self._heap) > 4 * len(running) + 64:
            self._rebuild(running)
        for s in running:
            if s not in self._known and s not in self._retired:
                self._push(s)
        pushed = self._epoch_at_push
        live = [s for s in running if s in pushed]
        if sum(map(pushed.__getitem__, live)) != sum(map(_epoch, live)):  # a member was refined
            self._rebuild(running)
        self._last, self._epochs = list(running), epochs

    def _rebuild(self, running: list[Sequence]) -> None:
        self._heap, self._known, self._epoch_at_push = [], set(), {}
        self._retired &= set(running)
        for s in running:
            if s not in self._retired:
                self._push(s)

    def ordered(self, running: list[Sequence], step: int) -> Iterator[Sequence]:
        """Preemptible running sequences, largest rank first (ties: latest arrival)."""
        self.step = step
        self._sync(running)
        popped: list[tuple[float, float, str, Sequence]] = []
        try:
            while self._heap:
                item = heapq.heappop(self._heap)
                key, _, _, s = item
                if s.status is not Status.RUNNING:
                    self._known.discard(s)
                    continue
                if not self.preemptible(s):
                    self._known.discard(s)
                    self._retired.add(s)
                    continue
                cur = -self.key(s)
                if abs(cur - key) > 1e-9 * (1.0 + abs(key)):  # e.g. an estimate floored at 0: re-file
                    heapq.heappush(self._heap, (cur, -s.arrival_time, s.request_id, s))
                    continue
                popped.append(item)
                yield s
        finally:
            for item in popped:
                heapq.heappush(self._heap, item)

    def forget(self, s: Sequence) -> None:
        self._known.discard(s)
        self._epoch_at_push.pop(s, None)
        self._retired.discard(s)
