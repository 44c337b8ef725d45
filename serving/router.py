"""Routing policies across replicas: pure objects over replica load snapshots (`EngineStats`).

`choose(stats, prompt_tokens, predicted_tokens) -> replica index`. The simulator and a gRPC router
call the same objects. `uses_tokens` tells the caller whether `outstanding_tokens` must be fresh.

- round-robin: ignores load.
- least-requests: fewest outstanding requests (waiting + running).
- power-of-two: two distinct replicas drawn at random (seeded), the one with fewer requests.
- token-aware (Kossmann et al.): least outstanding work in tokens (prompt tokens + predicted
  remaining tokens of every unfinished request), among replicas whose free KV pages can hold the
  request's prompt and predicted output; if none can, least work overall. Given the replicas'
  `num_slots`, a replica with a free batch slot comes first (work in tokens says how long a queue
  takes to drain, but a free slot starts the request at once, however long its neighbours are).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq

import numpy as np

from .engine_api import EngineStats
from .sequence import InvalidRequestError

ROUTER_NAMES = ("round-robin", "least-requests", "power-of-two", "token-aware")


class Router(ABC):
    name = "router"
    uses_tokens = False

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

    def __init__(self, page_size: int = 16, num_slots: int | None = None) -> None:
        if page_size < 1:
            raise InvalidRequestError("page_size", f"must be >= 1, got {page_size}")
        if num_slots is not None and num_slots < 1:
            raise InvalidRequestError("num_slots", f"must be >= 1, got {num_slots}")
        self.page_size, self.num_slots = page_size, num_slots

    def _choose(self, stats, prompt_tokens, predicted_tokens):
        need = -(-(prompt_tokens + int(np.ceil(predicted_tokens or 0.0))) // self.page_size)
        fits = [k for k, s in enumerate(stats) if s.pages_total - s.pages_used >= need]
        pool = fits or range(len(stats))
        slots = self.num_slots

        def busy(k: int) -> bool:
            return slots is not None and _requests(stats[k]) >= slots

        return min(pool, key=lambda k: (busy(k), stats[k].outstanding_tokens, _requests(stats[k]), k))


def make_router(name: str, **kw) -> Router:
    cls = {"round-robin": RoundRobin, "least-requests": LeastRequests, "power-of-two": PowerOfTwo,
           "token-aware": TokenAware}.get(name)
    if cls is None:
        raise InvalidRequestError("router", f"unknown router {name!r}; choose from {ROUTER_NAMES}")
    try:
        return cls(**kw)
    except TypeError as e:
        raise InvalidRequestError("router", f"bad options for {name!r}: {e}") from None
