"""An ordered view of the waiting queue that costs O(log n) per change instead of a sort per step.

Policies rank waiting sequences by a key that does not change while a sequence waits (predicted
remaining length, priority, Gittins index; aging keeps this true, see aging.py). The engine hands the
policy the whole waiting list every step, so a sort per step is O(n log n) per step: fine for the
engine's short queues, too slow for the simulator's long ones. `WaitIndex` keeps a heap in step with
the list using the policy hooks (on_arrival, on_finish, and the admit / preempt / victim decisions it
made), and checks that it is in step: the counts at every call, a C-speed checksum of the list (sum
of ids) every 16th call; a mismatch (a hook not called, a hand-made state) triggers a full rebuild.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator

from ...sequence import Sequence, Status

_WAITING = (Status.WAITING, Status.SWAPPED)
SMALL = 64  # below this many waiting sequences a plain sort is cheaper than bookkeeping


class WaitIndex:
    def __init__(self, key: Callable[[Sequence], tuple]):
        self.key = key
        self._heap: list[tuple[tuple, int, Sequence]] = []
        self._entry: dict[Sequence, int] = {}  # seq -> tick of its live heap entry
        self._idsum = 0
        self._tick = itertools.count()
        self._maybe_moved: list[Sequence] = []  # admitted or preempted since the last sync
        self._syncs = 0
        self._active = False  # off while the queue is small (plain sort); a sync rebuilds it

    # --- bookkeeping -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not self._active:
            return
        if seq in self._entry:
            self.discard(seq)
        t = next(self._tick)
        self._entry[seq] = t
        self._idsum += id(seq)
        heapq.heappush(self._heap, (self.key(seq), t, seq))

    def discard(self, seq: Sequence) -> None:
        if self._entry.pop(seq, None) is not None:
            self._idsum -= id(seq)

    def watch(self, seqs: list[Sequence]) -> None:
        """Sequences whose waiting status may change before the next sync (admit/preempt decisions)."""
        if self._active:
            self._maybe_moved.extend(seqs)

    def _sync(self, waiting: list[Sequence]) -> None:
        for s in self._maybe_moved:
            if s.status in _WAITING:
                if s not in self._entry:
                    self.add(s)
            else:
                self.discard(s)
        self._maybe_moved.clear()
        self._syncs += 1
        # the full checksum is O(n) (C-speed): every 16th sync, or at once when the counts disagree
        if len(waiting) != len(self._entry) or (
                self._syncs % 16 == 0 and sum(map(id, waiting)) != self._idsum):
            self.rebuild(waiting)
        if len(self._heap) > 4 * len(self._entry) + 64:  # too many stale entries: compact
            self.rebuild(waiting)

    def rebuild(self, waiting: list[Sequence]) -> None:
        self._active = True
        self._entry.clear()
        self._idsum = 0
        self._heap = []
        for s in waiting:
            t = next(self._tick)
            self._entry[s] = t
            self._idsum += id(s)
            self._heap.append((self.key(s), t, s))
        heapq.heapify(self._heap)

    # --- ordered iteration --------------------------------------------------------------------------
    def ordered(self, waiting: list[Sequence]) -> Iterator[Sequence]:
        """Yield waiting sequences best key first; stop early at no cost beyond what was consumed."""
        if len(waiting) <= SMALL:
            if self._active:  # drop the index; a rebuild restarts it if the queue grows again
                self._active = False
                self._maybe_moved.clear()
                self._entry.clear()
                self._heap = []
                self._idsum = 0
            yield from sorted(waiting, key=self.key)
            return
        self._sync(waiting)
        popped: list[tuple[tuple, int, Sequence]] = []
        try:
            while self._heap:
                item = heapq.heappop(self._heap)
                key, t, s = item
                if self._entry.get(s) != t:
                    continue  # stale entry of an admitted / re-added sequence
                fresh = self.key(s)
                if fresh != key:  # its rank changed while waiting: re-file it
                    t2 = next(self._tick)
                    self._entry[s] = t2
                    heapq.heappush(self._heap, (fresh, t2, s))
                    continue
                popped.append(item)
                yield s
        finally:
            for item in popped:
                heapq.heappush(self._heap, item)
