"""The HTTP door's open-loop driver: `jtrail.bench.loadgen.drive_grpc`'s twin through the OpenAI API
(the official `openai` client, SSE streaming), timed by the same `StreamTimes` rules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from jtrail.bench.loadgen import RunResult, StreamTimes, Workload


async def http_run(base_url: str, model: str, wl: Workload, timeout_s: float,
                   log: Callable[[str], None] = print) -> RunResult:
    """Open loop over /v1/chat/completions (chat prompts) or /v1/completions (text / token ids), SSE
    streaming with per-chunk usage (vLLM's `continuous_usage_stats`), so a chunk holding several tokens
    (--decode-steps > 1) is counted exactly. Times as loadgen's: perf_counter seconds from the start."""
    import openai

    times = StreamTimes(wl)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout_s)

    async def one(k: int) -> None:
        await times.wait_arrival(k)
        p = wl.params(k)
        kw: dict[str, Any] = dict(model=model, max_tokens=p.max_tokens, temperature=0.0, stream=True,
                                  stream_options={"include_usage": True, "continuous_usage_stats": True},
                                  extra_body={"ignore_eos": p.ignore_eos})
        prompt = wl.prompts[k]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            stream = await client.chat.completions.create(messages=prompt, **kw)
        else:
            stream = await client.completions.create(prompt=prompt, **kw)
        async with stream:
            async for chunk in stream:
                t = times.now()
                if chunk.usage is None or not chunk.choices:
                    continue
                times.tokens(k, chunk.usage.completion_tokens - int(times.nout[k]), t)
                if times.end(k, chunk.choices[0].finish_reason is not None, t):
                    break

    tasks = [asyncio.create_task(one(k)) for k in range(len(wl))]
    await asyncio.wait(tasks, timeout=timeout_s)
    for t in tasks:
        t.cancel()
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        log(f"  {len(failed)} HTTP requests failed, first: {failed[0].exception()!r}")
    await client.close()
    return times.result()


def drive_http(base_url: str, model: str, wl: Workload, timeout_s: float = 600.0,
               log: Callable[[str], None] = print) -> RunResult:
    """Open loop against a server's OpenAI-compatible HTTP API; failed requests are reported to `log`."""
    return asyncio.run(http_run(base_url, model, wl, timeout_s, log))
