"""The HTTP door's open-loop driver: `jtrail.bench.loadgen.drive_grpc`'s twin through the OpenAI API
(SSE streaming), timed by the same `StreamTimes` rules.

What it asks of the server is what an ordinary streaming client asks: `stream_options: {include_usage:
true}` (the one usage chunk at the end, standard OpenAI), each stream read to `data: [DONE]` so its
keep-alive connection goes back to the pool. A chunk's arrival time is taken when its line is read;
a request ends at the chunk carrying `finish_reason` (its E2E), and its token count is then checked
against the final usage. Tokens are counted one a chunk (the chat stream's opening role chunk
excepted), exact when the server decodes one token a step; with several tokens a chunk
(`chunk_usage=True`, for `jtrail serve --decode-steps` > 1) it asks for vLLM's per-chunk usage
(`continuous_usage_stats`) and counts from it, the only standard place a stream says how many tokens a
chunk holds. A count that disagrees with the final usage fails the request (a clear error, never a
silent miscount).

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
from jtrail.models.errors import JtrailError

CLIENTS = ("sse", "openai")


class TokenCountError(JtrailError, RuntimeError):
    """The tokens counted from a stream's chunks differ from the server's final usage."""


def request_body(model: str, wl: Workload, k: int, chunk_usage: bool = False) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of request k: /chat/completions for chat prompts, /completions for text or
    token ids; streamed, with the final usage chunk, and per-chunk usage only when `chunk_usage`."""
    p = wl.params(k)
    options: dict[str, bool] = {"include_usage": True}
    if chunk_usage:
        options["continuous_usage_stats"] = True
    body: dict[str, Any] = {"model": model, "max_tokens": p.max_tokens, "temperature": 0.0, "stream": True,
                            "stream_options": options, "ignore_eos": p.ignore_eos}
    prompt = wl.prompts[k]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return "/chat/completions", {**body, "messages": prompt}
    return "/completions", {**body, "prompt": prompt}


class _Tally:
    """One request's accounting from its chunks, whichever client parsed them."""

    def __init__(self, times: StreamTimes, k: int, chunk_usage: bool) -> None:
        self.times, self.k, self.chunk_usage = times, k, chunk_usage
        self.finished_at: float | None = None  # time of the chunk carrying finish_reason
        self.final_usage: int | None = None

    def chunk(self, usage: int | None, choices: bool, role_only: bool, finish: Any) -> bool:
        """Account one chunk (usage: its completion_tokens or None; choices: whether it has any;
        role_only: a chat opener with no content); True when the client should leave the stream now
        (the forced length reached under a nominal max_tokens, before the server finishes)."""
        t = self.times.now()
        if not choices:  # the final usage chunk (include_usage)
            self.final_usage = usage
            return False
        if self.finished_at is not None:
            return False
        if self.chunk_usage:
            m = 0 if usage is None else usage - int(self.times.nout[self.k])
        else:
            m = 0 if role_only else 1
        self.times.tokens(self.k, m, t)
        if finish is not None:
            self.finished_at = t  # E2E ends here; the count is checked against the final usage first
            return False
        return self.times.end(self.k, False, t)

    def close(self) -> None:
        """After the stream: a request the server finished ends at its finish chunk, once its count
        agrees with the final usage (a request left early was ended by `chunk`)."""
        if self.finished_at is None:
            return
        counted = int(self.times.nout[self.k])
        if self.final_usage is not None and self.final_usage != counted:
            hint = "" if self.chunk_usage else " (several tokens a chunk: drive with chunk_usage=True)"
            raise TokenCountError(f"request {self.k}: counted {counted} tokens, the server's usage says "
                                  f"{self.final_usage}{hint}")
        self.times.end(self.k, True, self.finished_at)


async def _one_sse(client: Any, base_url: str, model: str, wl: Workload, times: StreamTimes, k: int,
                   chunk_usage: bool) -> None:
    await times.wait_arrival(k)
    path, body = request_body(model, wl, k, chunk_usage)
    tally = _Tally(times, k, chunk_usage)
    async with client.stream("POST", base_url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():  # to the end: a fully read response keeps its connection
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if "error" in c:  # the server's error event after the stream started (then [DONE])
                raise RuntimeError(f"stream error: {c['error']}")
            usage, choices = c.get("usage"), c.get("choices")
            first = choices[0] if choices else {}
            delta = first.get("delta") or {}
            if tally.chunk(usage.get("completion_tokens") if usage else None, bool(choices),
                           bool(delta.get("role")) and not delta.get("content"), first.get("finish_reason")):
                return
    tally.close()


async def _one_openai(client: Any, model: str, wl: Workload, times: StreamTimes, k: int,
                      chunk_usage: bool) -> None:
    await times.wait_arrival(k)
    path, body = request_body(model, wl, k, chunk_usage)
    kw = {key: body.pop(key) for key in ("model", "max_tokens", "temperature", "stream", "stream_options")}
    create = client.chat.completions.create if path == "/chat/completions" else client.completions.create
    stream = await create(**kw, **{key: body.pop(key) for key in ("messages", "prompt") if key in body},
                          extra_body=body)
    tally = _Tally(times, k, chunk_usage)
    async with stream:
        async for c in stream:
            first = c.choices[0] if c.choices else None
            delta = getattr(first, "delta", None)
            role_only = delta is not None and bool(delta.role) and not delta.content
            if tally.chunk(c.usage.completion_tokens if c.usage else None, first is not None, role_only,
                           first.finish_reason if first is not None else None):
                return
    tally.close()


async def http_run(base_url: str, model: str, wl: Workload, timeout_s: float,
                   log: Callable[[str], None] = print, client: str = "sse",
                   chunk_usage: bool = False) -> RunResult:
    """Open loop over the OpenAI API at base_url (".../v1"). Times as loadgen's: perf_counter seconds
    from the start. `chunk_usage`: ask for per-chunk usage (a server decoding several tokens a step)."""
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, got {client!r}")
    times = StreamTimes(wl)
    if client == "sse":
        import httpx2

        http = httpx2.AsyncClient(timeout=timeout_s, trust_env=False,
                                  limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))
        one = lambda k: _one_sse(http, base_url, model, wl, times, k, chunk_usage)  # noqa: E731
    else:
        import openai

        http = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout_s)
        one = lambda k: _one_openai(http, model, wl, times, k, chunk_usage)  # noqa: E731
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
               log: Callable[[str], None] = print, client: str = "sse",
               chunk_usage: bool = False) -> RunResult:
    """Open loop against a server's OpenAI-compatible HTTP API; failed requests are reported to `log`.
    `chunk_usage`: True against a server decoding several tokens a step (see the module docstring)."""
    return asyncio.run(http_run(base_url, model, wl, timeout_s, log, client, chunk_usage))
