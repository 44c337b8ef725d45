"""Device calls issued from a thread of their own, in the order they were submitted.

On the H200 the decode call's CUDA graph launch holds the calling thread for about as long as the device
runs the step (`cuGraphLaunch` 1.5-1.8 ms of host time per call, also with the device idle before it;
benchmarks/ENGINE_NOTES.md). Issued from the engine's thread, that time adds to the engine's own Python
(output processing, scheduling, input rows) instead of overlapping it. jaxlib releases the GIL while it
executes a compiled call, so a worker thread can launch step N+1 while the engine processes step N's
tokens: vLLM's async scheduling, with the launch itself off the critical path.

Every device call of the runner goes through one `Launcher`, so calls keep their submission order (the
KV cache and the decode buffers are donated from one call to the next). Anything else that touches the
device state (swap, warm-up, a test reading the caches) calls `drain()` first.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Launcher:
    """Runs submitted calls in order: on one worker thread (`threaded`), or at once in the caller."""

    def __init__(self, threaded: bool):
        self.threaded = threaded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jtrail-launch") if threaded else None
        self._last: Future | None = None

    def submit(self, call: Callable[[], Any]) -> Future:
        """Queue `call` after every earlier one; its result (or, threaded, its exception) comes from
        the future. Not threaded, `call` runs now and an exception is raised here."""
        if self._pool is not None:
            self._last = self._pool.submit(call)
            return self._last
        done: Future = Future()
        done.set_result(call())
        return done

    def drain(self) -> None:
        """Wait until every submitted call has been issued (not for the device to finish them). An
        error of a call is not raised here: it belongs to whoever asks that call's future."""
        last = self._last
        if last is not None:
            last.exception()
