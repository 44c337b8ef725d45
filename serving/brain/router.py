"""Routing policies across replicas: pure objects over replica load snapshots (`EngineStats`).

`choose(stats, prompt_tokens, predicted_tokens) -> replica index`. The simulator and a gRPC router
call the same objects. `uses_tokens` tells the caller whether `outstanding_tokens` must be fresh and
`uses_forecast` whether `slot_free_tokens` must be.

- round-robin: ignores load.
- least-requests: fewest outstanding requests (waiting + running).
- power-of-two: two distinct replicas drawn at random (seeded), the one with fewer requests.
- token-aware: least expected wait for a batch slot. Each replica forecasts, from TRAIL's predicted
  remaining tokens of its running requests and the predicted lengths of the requests queued ahead of a
  new arrival, how many decode steps until each of its slots frees up (`slot_forecast`, a list schedule:
  the queue takes the earliest free slots in admission order). The router picks the replica whose first
  slot frees soonest among those whose free KV pages hold the request (prompt + expected output), each
  of its outstanding requests adding `request_weight` x expected_tokens steps (below); ties go to the
  fewest requests. Least-work-left (Kossmann et al.: least outstanding tokens) is the single-server form
  of the first-slot rule; on a replica with batch slots what a new request waits for is the first slot
  release, not the whole backlog: seven short requests and one long one free a slot sooner than three
  long ones, though they add up to more tokens.
  Why the per-request term: the first-slot forecast alone ranks replicas by differences of a few steps
  that are below its own error (the probe's refined MAE is ~100 tokens) and that the router's 50 ms-old
  snapshot (~8 decode steps) blurs anyway; and it ignores the queue behind the slot: under trail a new
  request of unknown length may rank ahead of queued ones (delaying each by a share of a slot) or behind
  them. Counting each outstanding request as 0.2 x expected_tokens steps (~60 steps for replay lengths)
  was chosen on the simulator's tuning seeds 1-4 (benchmarks/routing_sim_replay.py, 4000 requests;
  least-requests / token-aware mean E2E 1.011 at weight 0.07, 1.013-1.018 from 0.14 to 0.5, differences
  within the seeds' noise; 1.007 at 0, the first-slot rule with fewest-requests ties). It also cut
  token-aware's p99 TTFT (0.55-1.0 s from 1.0-1.55 s on those seeds).
  `batch_cost` > 0 (an option, off by default): the score becomes the request's expected completion in
  units of an empty batch's decode step, with each running sequence adding `batch_cost` (the step
  model's b/a, ~0.034 for the routing step model) to a step: wait x (1 + batch_cost x batch) + own
  tokens x (1 + batch_cost x min(batch + 1, slots)) + `slowdown_share` x batch_cost x sum over slots of
  min(slot's forecast, own tokens), the last term being the slow-down the request inflicts on the
  replica's running ones while they overlap. Own tokens are the request's estimate when the router is
  given one, else expected_tokens. On the simulator's tuning seeds (1-4, 4000 requests, the router given
  the prompt-probe estimate) batch_cost 0.0342 with slowdown_share 0.5 cut token-aware's mean E2E by
  0.6% (2.029 s from 2.041 s, 3 of 4 seeds; least-requests / token-aware 1.020 from 1.014), on seeds 5-8
  by 0.6% (2.047 s from 2.060 s, 3 of 4), p99 E2E lower on all 8; shares 0.25-2, or no estimate: within
  the seeds' noise (routing_sim8_replay_explore.json). Held-out seed 11 (routing_sim8_replay_batch_cost
  .json): 2.060 s from 2.065 s (least-requests / token-aware 1.031 from 1.028), p99 6.63 s from 6.59 s.
  Too little to be the default, and it needs the estimate, which `jtrail route` does not get.
  Replicas that report no forecast (older servers) fall back to least outstanding tokens, a free slot
  first. Forecasts are in decode steps, comparable across identical replicas (different hardware would
  need them in seconds).

What routing can gain is the wait for a slot: once a request runs, its time is its decode steps,
which no router shortens much when a step's fixed cost dominates (benchmarks/simulate.py, routing:
8 replicas of 8 slots at 90% load, fcfs, mean E2E least-requests / token-aware 1.008,
round-robin / token-aware 1.14; with trail replicas, where a request routed to a full replica
preempts a running one, the forecast matters far more).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq

import numpy as np

from ..engine_api import EngineStats
from ..paging import pages_for
from ..sequence import InvalidRequestError
from .forecast import FORECAST_PRIOR_TOKENS, MAX_LISTED, replica_forecast, slot_forecast

__all__ = ["FORECAST_PRIOR_TOKENS", "MAX_LISTED", "ROUTER_NAMES", "Router", "make_router", "replica_forecast",
           "slot_forecast"]

ROUTER_NAMES = ("round-robin", "least-requests", "power-of-two", "token-aware")



class Router(ABC):
    name = "router"
    uses_tokens = False
    uses_forecast = False

    def choose(self, stats: Seq[EngineStats], prompt_tokens: int,
               predicted_tokens: float | None = None) -> int:
        if not stats:
            raise InvalidRequestError("replicas", "no replica to route to")
        return self._choose(stats, prompt_tokens, predicted_tokens)

    @abstractmethod
    def _choose(self, stats: Seq[EngineStats], prompt_tokens: int, predicted_tokens: float | None) -> int: ...


def _requests(s: EngineStats) -> int:
    return s.waiting + s.running + s.swapped


class RoundRobin(Router):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def _choose(self, stats, prompt_tokens, predicted_tokens):
        k = self._next % len(stats)
        self._next = k + 1
        return k


class LeastRequests(Router):
    name = "least-requests"

    def _choose(self, stats, prompt_tokens, predicted_tokens):
        return min(range(len(stats)), key=lambda k: (_requests(stats[k]), k))


class PowerOfTwo(Router):
    name = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def _choose(self, stats, prompt_tokens, predicted_tokens):
        if len(stats) == 1:
            return 0
        a, b = (int(x) for x in self._rng.choice(len(stats), size=2, replace=False))
        return a if (_requests(stats[a]), a) <= (_requests(stats[b]), b) else b


class TokenAware(Router):
    name = "token-aware"
    uses_tokens = True
    uses_forecast = True

    # steps of expected wait each outstanding request adds, as a fraction of expected_tokens (module doc)
    REQUEST_WEIGHT = 0.2
    # weight of the slow-down a request inflicts on a replica's running ones (batch_cost > 0; module doc)
    SLOWDOWN_SHARE = 0.5

    def __init__(self, page_size: int = 16, num_slots: int | None = None, expected_tokens: float = 256.0,
                 forecast: bool = True, request_weight: float = REQUEST_WEIGHT, batch_cost: float = 0.0,
                 slowdown_share: float = SLOWDOWN_SHARE) -> None:
        """`expected_tokens`: output length assumed for a request with no prediction (KV pages it needs).
        `num_slots`: only for the fallback rule. `forecast=False`: always the fallback rule (least
        outstanding tokens), kept to compare with. `request_weight`: each outstanding request of a
        replica adds request_weight x expected_tokens decode steps to its first-slot forecast.
        `batch_cost`, `slowdown_share`: the expected-completion score (module doc); batch_cost 0 keeps the
        first-slot rule."""
        if page_size < 1:
            raise InvalidRequestError("page_size", f"must be >= 1, got {page_size}")
        if num_slots is not None and num_slots < 1:
            raise InvalidRequestError("num_slots", f"must be >= 1, got {num_slots}")
        if not expected_tokens >= 0:
            raise InvalidRequestError("expected_tokens", f"must be >= 0, got {expected_tokens}")
        if not (request_weight >= 0 and np.isfinite(request_weight)):
            raise InvalidRequestError("request_weight", f"must be finite and >= 0, got {request_weight}")
        self.page_size, self.num_slots, self.expected_tokens = page_size, num_slots, float(expected_tokens)
        self.request_weight = float(request_weight)
        for name, v in (("batch_cost", batch_cost), ("slowdown_share", slowdown_share)):
            if not (v >= 0 and np.isfinite(v)):
                raise InvalidRequestError(name, f"must be finite and >= 0, got {v}")
        self.batch_cost, self.slowdown_share = float(batch_cost), float(slowdown_share)
        self.forecast = forecast
        self.uses_forecast = forecast

    def _choose(self, stats, prompt_tokens, predicted_tokens):
        out = self.expected_tokens if predicted_tokens is None else float(predicted_tokens)
        need = pages_for(prompt_tokens + int(np.ceil(out)), self.page_size)
        fits = [k for k, s in enumerate(stats) if s.pages_total - s.pages_used >= need]
        pool = fits or range(len(stats))
        if self.forecast and all(s.slot_free_tokens for s in stats):
            score = self.expected_wait if not self.batch_cost else lambda s: self.expected_completion(s, out)
            return min(pool, key=lambda k: (score(stats[k]), _requests(stats[k]), k))
        slots = self.num_slots

        def busy(k: int) -> bool:
            return slots is not None and _requests(stats[k]) >= slots

        return min(pool, key=lambda k: (busy(k), stats[k].outstanding_tokens, _requests(stats[k]), k))

    def expected_wait(self, s: EngineStats) -> float:
        """The forecast rule's score of a replica, in decode steps: its first slot's forecast plus
        request_weight x expected_tokens per outstanding request."""
        return s.slot_free_tokens[0] + self.request_weight * self.expected_tokens * _requests(s)

    def expected_completion(self, s: EngineStats, out: float) -> float:
        """The batch_cost rule's score of a replica for a request of `out` expected tokens, in empty-batch
        decode steps: its wait and its own decode, each step lengthened by batch_cost per sequence in
        the batch, plus slowdown_share x the steps it adds to the running ones while they overlap."""
        slots = len(s.slot_free_tokens)
        batch = min(_requests(s), slots)
        c = self.batch_cost
        overlap = sum(min(f, out) for f in s.slot_free_tokens if f > 0)
        return (self.expected_wait(s) * (1 + c * batch) + out * (1 + c * min(batch + 1, slots))
                + self.slowdown_share * c * overlap)


def make_router(name: str, **kw) -> Router:
    cls = {"round-robin": RoundRobin, "least-requests": LeastRequests, "power-of-two": PowerOfTwo,
           "token-aware": TokenAware}.get(name)
    if cls is None:
        raise InvalidRequestError("router", f"unknown router {name!r}; choose from {ROUTER_NAMES}")
    try:
        return cls(**kw)
    except TypeError as e:
        raise InvalidRequestError("router", f"bad options for {name!r}: {e}") from None
