"""The serving process's periodic load line at INFO, as vLLM prints it:

    Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 96.0 tokens/s, Running: 8 reqs,
    Waiting: 3 reqs, KV cache usage: 41.2%, Preemptions: 0

Logged on the `jtrail.stats` logger every `interval_s` while there is activity (tokens moved, or
requests running or waiting), plus one line once the server falls idle; silent while idle. Rates
are over the interval just ended, from the engine's running token totals (`EngineStats`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..engine_api import EngineStats

stats_log = logging.getLogger("jtrail.stats")


def format_stats(s: EngineStats, prompt_tps: float, generation_tps: float) -> str:
    usage = 100.0 * s.pages_used / s.pages_total if s.pages_total else 0.0
    return (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, Avg generation throughput: "
            f"{generation_tps:.1f} tokens/s, Running: {s.running} reqs, Waiting: {s.waiting} reqs, "
            f"KV cache usage: {usage:.1f}%, Preemptions: {s.preemptions}")


class StatsLogger:
    """Call `tick()` every interval (or run `run()` as a task); it logs when there is something to say."""

    def __init__(self, stats: Callable[[], EngineStats], interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 (0 turns the log off at the caller), got {interval_s}")
        self.stats, self.interval_s, self.clock = stats, interval_s, clock
        s = stats()
        self._t, self._prompt, self._gen = clock(), s.prompt_tokens_total, s.generation_tokens_total
        self._was_active = False

    def tick(self) -> str | None:
        """Log (and return) the line for the interval since the last tick, or None while idle."""
        s, now = self.stats(), self.clock()
        dt = max(now - self._t, 1e-9)
        d_prompt, d_gen = s.prompt_tokens_total - self._prompt, s.generation_tokens_total - self._gen
        self._t, self._prompt, self._gen = now, s.prompt_tokens_total, s.generation_tokens_total
        active = bool(d_prompt or d_gen or s.running or s.waiting)
        if not (active or self._was_active):  # idle now and at the last tick: nothing new to say
            return None
        self._was_active = active
        line = format_stats(s, d_prompt / dt, d_gen / dt)
        stats_log.info("%s", line)
        return line

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.tick()
