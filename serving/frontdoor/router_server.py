"""A gRPC front end that speaks the server's own API (`jtrail.v1.Jtrail`) and routes each request to
one of several jtrail servers (data-parallel replicas) with a policy of `brain/router.py`.

Load snapshots come from each replica's `Stats` RPC, polled in the background; between polls the
router counts what it sent itself, so a burst does not all land on the replica that looked idlest at
the last poll. Streams are forwarded response by response; a client that goes away cancels the
replica's RPC, so the replica frees the request's slot and pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from ..brain.forecast import FORECAST_PRIOR_TOKENS, count_routed
from ..brain.router import Router
from ..engine_api import EngineStats, ModelInfo
from .proto import jtrail_v1_pb2 as pb
from .proto import jtrail_v1_pb2_grpc as pb_grpc
from .servicer import info_to_pb, stats_to_pb

log = logging.getLogger(__name__)


def _stats_from_pb(s: pb.StatsResponse) -> EngineStats:
    return EngineStats(waiting=s.waiting, running=s.running, swapped=s.swapped, pages_used=s.pages_used,
                       pages_total=s.pages_total, preemptions=s.preemptions,
                       outstanding_tokens=s.outstanding_tokens, finished_by_reason=dict(s.finished_by_reason),
                       steps=s.steps, slot_free_tokens=list(s.slot_free_tokens))


def estimate_prompt_tokens(req: pb.GenerateRequest) -> int:
    """Prompt length for routing, without a tokenizer: ids exactly, text at ~4 characters a token."""
    kind = req.WhichOneof("prompt")
    if kind == "token_ids":
        return len(req.token_ids.ids)
    if kind == "chat":
        return sum(len(m.content) // 4 + 4 for m in req.chat.messages)
    return len(req.text) // 4 + 1


class ReplicaSet:
    """The replicas behind the router: channels, stubs and load snapshots (the server's "engine")."""

    def __init__(self, targets: Sequence[str], router: Router, poll_s: float = 0.05,
                 expected_tokens: float = FORECAST_PRIOR_TOKENS):
        if not targets:
            raise ValueError("the router needs at least one replica (--replicas host:port,...)")
        self.targets, self.router, self.poll_s = list(targets), router, poll_s
        self.expected_tokens = expected_tokens  # output assumed for a request the router just sent
        self.channels: list[grpc.aio.Channel] = []  # made in start(): aio channels need the running loop
        self.stubs: list[pb_grpc.JtrailStub] = []
        self.snapshots = [EngineStats() for _ in self.targets]
        self.routed = [0] * len(self.targets)  # requests sent to each replica (reported in ServerInfo)
        self._info: pb.ServerInfoResponse | None = None
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        self.channels = [grpc.aio.insecure_channel(t) for t in self.targets]
        self.stubs = [pb_grpc.JtrailStub(c) for c in self.channels]
        infos = await asyncio.gather(*(s.ServerInfo(pb.ServerInfoRequest(), timeout=10) for s in self.stubs))
        self._info = infos[0]
        self.snapshots = [_stats_from_pb(i.stats) for i in infos]
        self._poller = asyncio.create_task(self._poll(), name="jtrail-router-poll")

    async def _poll(self) -> None:
        while True:
            for k, stub in enumerate(self.stubs):
                with contextlib.suppress(grpc.aio.AioRpcError):  # a replica down keeps its last snapshot
                    self.snapshots[k] = _stats_from_pb(await stub.Stats(pb.StatsRequest(), timeout=1.0))
            await asyncio.sleep(self.poll_s)

    def pick(self, req: pb.GenerateRequest) -> int:
        prompt = estimate_prompt_tokens(req)
        k = self.router.choose(self.snapshots, prompt, None)
        # Count our own send until the next poll replaces the snapshot. Its output length is assumed, not
        # read from max_tokens: a benchmark that forces lengths sets max_tokens to the true length,
        # which a real router would not know.
        self.snapshots[k] = count_routed(self.snapshots[k], prompt, self.expected_tokens)
        self.routed[k] += 1
        return k

    def stats(self) -> EngineStats:
        tot = EngineStats()
        for s in self.snapshots:
            for f in ("waiting", "running", "swapped", "pages_used", "pages_total", "preemptions",
                      "outstanding_tokens"):
                setattr(tot, f, getattr(tot, f) + getattr(s, f))
            for r, n in s.finished_by_reason.items():
                tot.finished_by_reason[r] = tot.finished_by_reason.get(r, 0) + n
        tot.slot_free_tokens = sorted(f for s in self.snapshots for f in s.slot_free_tokens)
        return tot

    def info(self) -> ModelInfo:
        i = self._info
        assert i is not None, "start() first"
        return ModelInfo(model_name=i.model, max_model_len=i.max_model_len, vocab_size=i.vocab_size,
                         policy=f"{self.router.name} over {len(self.targets)} x {i.policy}",
                         num_slots=i.num_slots * len(self.targets), page_size=i.page_size,
                         num_pages=i.num_pages * len(self.targets), probe=i.probe or None)

    async def shutdown(self, grace_s: float = 0.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for c in self.channels:
            await c.close()


class RouterServicer(pb_grpc.JtrailServicer):
    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802 - gRPC method name
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        k = self.replicas.pick(request)
        call = self.replicas.stubs[k].Generate(request, timeout=context.time_remaining())
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as e:  # the replica's status (INVALID_ARGUMENT, ...) passes through
            await context.abort(e.code(), e.details() or "")
        finally:
            call.cancel()  # no-op after a finished stream; frees the replica's slot if the client left

    async def ServerInfo(self, request: pb.ServerInfoRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        return info_to_pb(self.replicas.info(), self.replicas.stats())

    async def Stats(self, request: pb.StatsRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return stats_to_pb(self.replicas.stats())
