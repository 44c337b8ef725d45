"""Python clients for a `jtrail serve` server: `Client` (blocking) and `AsyncClient` (asyncio).

    for delta in Client("127.0.0.1:50051").generate("Hello", max_tokens=32):
        print(delta.text, end="", flush=True)

Leaving the loop early (break, exception, garbage collection) cancels the RPC, and the server then
frees the request's slot and KV pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jtrail.serving.frontdoor.proto import jtrail_v1_pb2 as pb
from jtrail.serving.frontdoor.proto import jtrail_v1_pb2_grpc as pb_grpc

_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
            pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_ERROR: "error"}


@dataclass
class Delta:
    """One streamed update: the tokens and text produced since the previous one."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None until the last delta
    prompt_tokens: int
    completion_tokens: int
    remaining_estimate: float | None = None


@dataclass
class GenerateOptions:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    priority: int = 0
    ignore_eos: bool = False
    request_id: str = ""
    forced_output_ids: list[int] = field(default_factory=list)  # trace replay (benchmarks)


def build_request(prompt: str | list[int] | list[dict[str, str]], **options: Any) -> pb.GenerateRequest:
    """A GenerateRequest from text, token ids, or chat messages ([{"role", "content"}, ...])."""
    o = GenerateOptions(**options)
    req = pb.GenerateRequest(stop=o.stop, stop_token_ids=o.stop_token_ids, priority=o.priority,
                             ignore_eos=o.ignore_eos, request_id=o.request_id,
                             forced_output_ids=o.forced_output_ids)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    else:
        req.token_ids.ids.extend(prompt)
        req.token_ids.SetInParent()  # an empty id list is still "token_ids", so the server can say so
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(o, name) is not None:
            setattr(req.sampling, name, getattr(o, name))
    if o.max_tokens is not None:
        req.max_tokens = o.max_tokens
    return req


def to_delta(r: pb.GenerateResponse) -> Delta:
    return Delta(request_id=r.request_id, token_ids=list(r.token_ids), text=r.text,
                 finish_reason=_REASONS.get(r.finish_reason), prompt_tokens=r.usage.prompt_tokens,
                 completion_tokens=r.usage.completion_tokens,
                 remaining_estimate=r.remaining_estimate if r.HasField("remaining_estimate") else None)


class Client:
    """Blocking client. `timeout` (seconds) becomes the RPC deadline."""

    def __init__(self, target: str = "127.0.0.1:50051") -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.JtrailStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: str | list[int] | list[dict[str, str]], timeout: float | None = None,
                 **options: Any) -> Iterator[Delta]:
        call = self.stub.Generate(build_request(prompt, **options), timeout=timeout)
        try:
            for r in call:
                yield to_delta(r)
        finally:
            call.cancel()  # no-op when the stream already ended; frees the server's slot if not

    def server_info(self, timeout: float | None = 10.0) -> pb.ServerInfoResponse:
        return self.stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout)

    def stats(self, timeout: float | None = 10.0) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=timeout)

    def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        """'SERVING', 'NOT_SERVING', ... for `service` ('' = the whole server)."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; create it inside the running event loop."""

    def __init__(self, target: str = "127.0.0.1:50051") -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.JtrailStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def generate(self, prompt: str | list[int] | list[dict[str, str]], timeout: float | None = None,
                       **options: Any) -> AsyncIterator[Delta]:
        call = self.stub.Generate(build_request(prompt, **options), timeout=timeout)
        try:
            async for r in call:
                yield to_delta(r)
        finally:
            call.cancel()

    async def server_info(self, timeout: float | None = 10.0) -> pb.ServerInfoResponse:
        return await self.stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout)

    async def stats(self, timeout: float | None = 10.0) -> pb.StatsResponse:
        return await self.stub.Stats(pb.StatsRequest(), timeout=timeout)

    async def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        r = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
