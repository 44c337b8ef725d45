"""Running sequences by rank (largest first) for the preemption check, in O(log n) per query.

Why it can be incremental: every running sequence gains one token per step and its estimate counts
down one per token, so `rank + generated` stays fixed between refinements; the order of the running
sequences by rank only changes when one is refined (predictors bump `Sequence.prediction_epoch`) or
the running set changes. A C-speed comparison with the last running list and its epoch sum tells which:
new sequences are pushed, a refinement rebuilds. (The check compares the list itself, not a sum of
ids: a finished sequence's id can be reused by a new object.) Preemptibility (generated <= c x initial) never
comes back once lost, so lost ones are retired. Entries are validated when they reach the top.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from operator import attrgetter

from ..sequence import Sequence, Status

_epoch = attrgetter("prediction_epoch")


class RunIndex:
    def __init__(self, key: Callable[[Sequence], float], preemptible: Callable[[Sequence], bool]):
        self.key, self.preemptible = key, preemptible  # key: rank + generated (or a fixed rank)
        # (-key, -arrival, request_id, seq): ties go to the latest arrival, independent of history
        self._heap: list[tuple[float, float, str, Sequence]] = []
        self._known: set[Sequence] = set()  # sequences with a live entry
        self._retired: set[Sequence] = set()  # past their preemption cutoff
        self._last: list[Sequence] = []  # the running list at the last sync (holds the objects, so
        self._epochs = 0  # a freed sequence's id cannot be reused by a new one unnoticed)

    def _push(self, s: Sequence) -> None:
        self._known.add(s)
        heapq.heappush(self._heap, (-self.key(s), -s.arrival_time, s.request_id, s))

    def _sync(self, running: list[Sequence]) -> None:
        epochs = sum(map(_epoch, running))
        if epochs == self._epochs and running == self._last:  # C-speed identity comparison
            return
        if epochs != self._epochs or len(self._heap) > 4 * len(running) + 64:
            self._heap, self._known = [], set()
            self._retired &= set(running)
        self._last, self._epochs = list(running), epochs
        for s in running:
            if s not in self._known and s not in self._retired:
                self._push(s)

    def ordered(self, running: list[Sequence]) -> Iterator[Sequence]:
        """Preemptible running sequences, largest rank first."""
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
                if abs(cur - key) > 1e-9 * (1.0 + abs(key)):  # e.g. an estimate floored at 0
                    heapq.heappush(self._heap, (cur, -s.arrival_time, s.request_id, s))
                    continue
                popped.append(item)
                yield s
        finally:
            for item in popped:
                heapq.heappush(self._heap, item)

    def forget(self, s: Sequence) -> None:
        self._known.discard(s)
        self._retired.discard(s)
