"""The gRPC server: `jtrail.v1.Jtrail` + standard health + reflection + Prometheus, with graceful drain.

Lifecycle: `start()` starts the engine, binds (127.0.0.1 by default), marks health SERVING and starts
the metrics endpoint. `stop(grace)` marks health NOT_SERVING, stops accepting RPCs and lets in-flight
streams finish for up to `grace` seconds (then they are cancelled, which aborts them in the engine),
and only then shuts the engine down. `serve_forever()` runs until SIGTERM/SIGINT, or until the
engine loop dies: then health goes NOT_SERVING at once, the server stops, and `fatal_error` holds
the cause (`jtrail serve` exits non-zero so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..engine_api import AsyncEngine
from .metrics import ServerMetrics
from .proto import jtrail_v1_pb2_grpc as pb_grpc
from .reflection import enable_reflection
from .servicer import SERVICE_NAME, JtrailServicer
from .wire import add_jtrail_servicer

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless the operator opts in to exposure
    port: int = 50051  # 0 picks a free port (see JtrailServer.port)
    metrics_port: int | None = None  # None: no HTTP endpoint (metrics still collected)
    metrics_host: str | None = None  # defaults to `host`
    grace_s: float = 10.0  # drain time for in-flight streams on shutdown
    default_max_tokens: int = 256
    max_queue: int = 0  # reported in ServerInfo; the engine enforces it
    stats_interval_s: float = 0.5  # how often engine gauges are refreshed
    # after the engine dies: how long the server still answers UNAVAILABLE itself before it stops (a
    # call caught by the gRPC runtime's own shutdown may end CANCELLED instead)
    fatal_drain_s: float = 1.0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class JtrailServer:
    def __init__(self, engine: AsyncEngine, config: ServerConfig | None = None,
                 servicer: pb_grpc.JtrailServicer | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        """`servicer` replaces the engine-backed one (the router forwards to replicas instead); the
        `engine` then only needs start/stats/shutdown. `metrics`: a registry shared with another front
        door on the same engine (the HTTP API), else a fresh one."""
        self.engine = engine
        self.servicer = servicer
        self.config = config or ServerConfig()
        self.metrics = metrics or ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stats_task: asyncio.Task | None = None
        self._stop_event: asyncio.Event | None = None
        self.on_started: Callable[[], None] | None = None  # called once bound (e.g. print the port)
        self.fatal_error: BaseException | None = None  # why the engine loop died, if it did
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        c = self.config
        if hasattr(self.engine, "on_fatal"):  # engines that can die report it (AsyncLLMEngine)
            self.engine.on_fatal = self._engine_died
        # Metrics first: a bad or busy --metrics-port fails before anything else is running.
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(c.metrics_port, c.metrics_host or c.host)
        try:
            await self._start_grpc()
        except BaseException:
            self.metrics.stop_http()
            raise

    async def _start_grpc(self) -> None:
        c = self.config
        # SO_REUSEPORT off: gRPC sets it by default on Linux, so that a second server on a busy port
        # would bind without error and split the traffic with the first.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_jtrail_servicer(
            self.servicer or JtrailServicer(self.engine, self.metrics, c.default_max_tokens, c.max_queue),
            server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
        try:
            port = server.add_insecure_port(_address(c.host, c.port))
        except RuntimeError:  # grpcio raises "Failed to bind" (older versions return 0)
            port = 0
        if port == 0:
            raise OSError(f"--port {c.port}: cannot bind the gRPC server to {_address(c.host, c.port)} "
                          "(in use, or not an address of this machine)")
        await self.engine.start()
        await server.start()
        self._server, self.port = server, port
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._stats_task = asyncio.create_task(self._refresh_stats(), name="jtrail-stats")
        log.info("jtrail serving on %s (metrics port %s)", _address(c.host, port), self.metrics_port)

    def _engine_died(self, exc: BaseException) -> None:
        """Called on the event loop when the engine loop has died: its streams have failed with
        UNAVAILABLE already; stop advertising the service and stop the server."""
        self.fatal_error = exc
        log.critical("engine loop died (%r): marking NOT_SERVING and stopping the server", exc)
        task = asyncio.ensure_future(self.health.enter_graceful_shutdown())  # NOT_SERVING, for good
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        asyncio.get_running_loop().call_later(self.config.fatal_drain_s, self.request_stop)

    async def _refresh_stats(self) -> None:
        while True:
            self.metrics.update_engine(self.engine.stats())
            await asyncio.sleep(self.config.stats_interval_s)

    async def stop(self, grace_s: float | None = None, stop_engine: bool = True) -> None:
        """Stop accepting, drain in-flight streams for up to `grace_s`, then stop the engine (unless
        another front door on the same engine is still draining: `stop_engine=False`)."""
        if self._server is None:
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()  # load balancers stop sending first
        await self._server.stop(grace)
        self._server = None
        if stop_engine:
            await self.engine.shutdown(grace_s=0.0)
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        self.metrics.update_engine(self.engine.stats())
        self.metrics.stop_http()

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    async def serve_forever(self) -> None:
        """Start, run until SIGTERM/SIGINT (or `request_stop()`), then stop gracefully."""
        self._stop_event = asyncio.Event()
        await self.start()
        if self.on_started is not None:
            self.on_started()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # non-main thread / Windows
                loop.add_signal_handler(sig, self._stop_event.set)
        try:
            await self._stop_event.wait()
            log.info("shutting down: draining in-flight streams for up to %.1fs", self.config.grace_s)
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
