"""Slot and KV-page accounting for `MockEngine`: a waiting queue, running slots, a page free list.

Mirrors the real engine's resource rules so tests of the server exercise them: a request is admitted
only with a free slot and pages for its tokens so far plus one; a running request that needs a page
when none is free preempts the most recently admitted request by recompute (vLLM's default).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from .sequence import RequestOutput, SamplingParams


@dataclass(eq=False)
class MockRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    slot: int | None = None
    finished: bool = False
    outputs: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class MockScheduler:
    def __init__(self, num_slots: int, num_pages: int, page_size: int, priority: bool = False):
        self.page_size = page_size
        self.num_pages = num_pages
        self.priority = priority  # order the queue by (priority, arrival) instead of arrival
        self.waiting: deque[MockRequest] = deque()
        self.running: list[MockRequest] = []
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.free_pages = list(range(num_pages - 1, -1, -1))
        self.preemptions = 0
        self._by_id: dict[str, MockRequest] = {}

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def add(self, req: MockRequest) -> None:
        self._by_id[req.request_id] = req
        self.waiting.append(req)

    def find(self, request_id: str) -> MockRequest | None:
        return self._by_id.get(request_id)

    def remove(self, req: MockRequest) -> None:
        """Drop a finished or cancelled request wherever it is, freeing its slot and pages at once."""
        self._by_id.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _release(self, req: MockRequest) -> None:
        self.free_pages.extend(req.pages)
        req.pages = []
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None

    def _next_waiting(self) -> MockRequest:
        if not self.priority:
            return self.waiting[0]
        return min(self.waiting, key=lambda r: (r.priority, r.arrival))

    def admit(self) -> list[MockRequest]:
        admitted = []
        while self.waiting and self.free_slots:
            req = self._next_waiting()
            need = self.pages_for(req.num_tokens + 1)
            if need > len(self.free_pages):
                break  # head-of-line blocking on memory, as in vLLM's FCFS
            self.waiting.remove(req)
            req.slot = self.free_slots.pop()
            req.pages = [self.free_pages.pop() for _ in range(need)]
            self.running.append(req)
            admitted.append(req)
        return admitted

    def ensure_page_for_next_token(self, req: MockRequest) -> bool:
        """Give `req` room for one more token; False if `req` itself had to be preempted."""
        while len(req.pages) < self.pages_for(req.num_tokens + 1):
            if self.free_pages:
                req.pages.append(self.free_pages.pop())
                continue
            victim = self.running[-1]  # most recently admitted
            self.running.remove(victim)
            self._release(victim)
            self.waiting.appendleft(victim)
            self.preemptions += 1
            if victim is req:
                return False
        return True
