"""The HTTP door's open-loop driver: `jtrail.bench.loadgen.drive_grpc`'s twin through the OpenAI API
(SSE streaming), timed by the same `StreamTimes` rules.

Two clients. `sse` (the default) posts the JSON body with httpx2 and reads the `data:` lines itself
(json.loads: ~11 us a chunk on the 2-core dev machine). `openai` goes through the official `openai`
client, which builds its chunk model for every chunk (~200 us there, the json.loads included): at one
token a chunk, 32 slots and a few ms a decode step that is most of a core in the driver's one process,
so the HTTP figures would time the client. Seen on `http_bench.py --mock` runs on that machine: HTTP
mean TTFT 0.15-2.0 s with the openai client against 0.03-0.05 s with sse (gRPC 0.02 s, guidellm
0.04-0.06 s on the same server). The tests check the API with the `openai` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from jtrail.bench.loadgen import RunResult, StreamTimes, Workload

CLIENTS = ("sse", "openai")


def request_body(model: str, wl: Workload, k: int) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of request k: /chat/completions for chat prompts, /completions for text or
    token ids; streamed, with per-chunk usage (vLLM's `continuous_usage_stats`), so a chunk holding
    several tokens (--decode-steps > 1) is counted exactly."""
    p = wl.params(k)
    body: dict[str, Any] = {"model": model, "max_tokens": p.max_tokens, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                            "ignore_eos": p.ignore_eos}
    prompt = wl.prompts[k]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return "/chat/completions", {**body, "messages": prompt}
    return "/completions", {**body, "prompt": prompt}


def _chunk(times: StreamTimes, k: int, usage: Any, choices: Any, finish: Any) -> bool:
    """Account one streamed chunk of request k; True when the request is over."""
    t = times.now()
    if usage is None or not choices:
        return False
    times.tokens(k, int(usage) - int(times.nout[k]), t)
    return times.end(k, finish is not None, t)


async def _one_sse(client: Any, base_url: str, model: str, wl: Workload, times: StreamTimes, k: int) -> None:
    await times.wait_arrival(k)
    path, body = request_body(model, wl, k)
    async with client.stream("POST", base_url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            c = json.loads(data)
            usage, choices = c.get("usage"), c.get("choices")
            if _chunk(times, k, usage.get("completion_tokens") if usage else None, choices,
                      choices[0].get("finish_reason") if choices else None):
                break


async def _one_openai(client: Any, model: str, wl: Workload, times: StreamTimes, k: int) -> None:
    await times.wait_arrival(k)
    path, body = request_body(model, wl, k)
    kw = {key: body.pop(key) for key in ("model", "max_tokens", "temperature", "stream", "stream_options")}
    create = client.chat.completions.create if path == "/chat/completions" else client.completions.create
    stream = await create(**kw, **{key: body.pop(key) for key in ("messages", "prompt") if key in body},
                          extra_body=body)
    async with stream:
        async for c in stream:
            if _chunk(times, k, c.usage.completion_tokens if c.usage else None, c.choices,
                      c.choices[0].finish_reason if c.choices else None):
                break


async def http_run(base_url: str, model: str, wl: Workload, timeout_s: float,
                   log: Callable[[str], None] = print, client: str = "sse") -> RunResult:
    """Open loop over the OpenAI API at base_url (".../v1"). Times as loadgen's: perf_counter seconds
    from the start."""
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, got {client!r}")
    times = StreamTimes(wl)
    if client == "sse":
        import httpx2

        http = httpx2.AsyncClient(timeout=timeout_s, trust_env=False,
                                  limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))
        one = lambda k: _one_sse(http, base_url, model, wl, times, k)  # noqa: E731
    else:
        import openai

        http = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout_s)
        one = lambda k: _one_openai(http, model, wl, times, k)  # noqa: E731
    tasks = [asyncio.create_task(one(k)) for k in range(len(wl))]
    await asyncio.wait(tasks, timeout=timeout_s)
    for t in tasks:
        t.cancel()
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        log(f"  {len(failed)} HTTP requests failed, first: {failed[0].exception()!r}")
    await (http.aclose() if client == "sse" else http.close())
    return times.result()


def drive_http(base_url: str, model: str, wl: Workload, timeout_s: float = 600.0,
               log: Callable[[str], None] = print, client: str = "sse") -> RunResult:
    """Open loop against a server's OpenAI-compatible HTTP API; failed requests are reported to `log`."""
    return asyncio.run(http_run(base_url, model, wl, timeout_s, log, client))
