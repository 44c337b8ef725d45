"""Highest response ratio next (HRRN, Brinch Hansen 1971) on predicted remaining length.

response ratio = (wait + service) / service; the highest runs first. With service measured in the
rank's units (predicted tokens) and the wait in seconds the ratio mixes units, but its order does not:
(w + S) / S ranks as w / S, and w / S orders alike in any units of S. So the key is -(wait / rank):
a short request overtakes after a short wait, a long one after a wait in proportion to its length,
and nothing starves (every ratio grows without bound).

The key changes with time and two keys can cross (w_i / S_i vs w_j / S_j), so the waiting queue
cannot be a static heap: the policy sorts the waiting list at each `schedule` (O(n log n) per call).
Ties (equal ratios, e.g. every request at wait 0) go to the smaller rank, then the earlier arrival.
"""

from __future__ import annotations

from ...sequence import Sequence


def hrrn_key(rank: float, seq: Sequence, now: float) -> tuple:
    """Sort key (ascending = runs first) of a waiting request with `rank` predicted tokens at `now`."""
    wait = max(now - seq.arrival_time, 0.0)
    return (-wait / max(rank, 1.0), rank, seq.arrival_time, seq.request_id)
