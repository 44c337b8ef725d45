"""Prometheus metrics for the server (both front doors), on a dedicated CollectorRegistry per server.

A per-server registry (not prometheus-client's global one) keeps several servers in one process —
tests, multi-replica benchmarks — from colliding. Latency histograms are observed by the server per
request (vLLM's definitions: TTFT, TPOT = (E2E - TTFT) / (output_tokens - 1), E2E); engine load
gauges are refreshed from `AsyncEngine.stats()` on the event loop, so the HTTP thread never touches
engine state. The same quantities are also exported under vLLM's names (vllm_metrics.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from ..engine_api import EngineStats
from .vllm_metrics import VllmMetrics

# One line per finished request (as vLLM logs them); silence with logging.getLogger("jtrail.requests")
request_log = logging.getLogger("jtrail.requests")

# Seconds; spans sub-ms mock steps up to multi-minute long generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 120.0, 300.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass
class RequestTiming:
    """What the server measured for one finished request (monotonic seconds)."""

    arrival: float
    first_token: float | None
    finish: float
    output_tokens: int
    request_id: str = ""
    prompt_tokens: int | None = None


class ServerMetrics:
    def __init__(self, namespace: str = "jtrail", model_name: str = "") -> None:
        """`model_name`: the `model_name` label of the vLLM-named metrics (vLLM's served model name)."""
        self.registry = CollectorRegistry()
        r, ns = self.registry, namespace
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token", namespace=ns,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("time_per_output_token_seconds", "Mean time per output token after the "
                              "first", namespace=ns, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("e2e_request_latency_seconds", "End-to-end request latency", namespace=ns,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("requests_waiting", "Requests in the waiting queue", namespace=ns, registry=r)
        self.running = Gauge("requests_running", "Requests holding a batch slot", namespace=ns, registry=r)
        self.pages_used = Gauge("kv_pages_used", "KV cache pages in use", namespace=ns, registry=r)
        self.pages_total = Gauge("kv_pages_total", "KV cache pages in the pool", namespace=ns, registry=r)
        self.preemptions = Counter("preemptions", "Requests preempted by the engine", namespace=ns,
                                   registry=r)
        self.finished = Counter("requests_finished", "Finished requests by finish reason", ["reason"],
                                namespace=ns, registry=r)
        self.rejected = Counter("requests_rejected", "Requests refused before running, by gRPC status",
                                ["code"], namespace=ns, registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of requests that produced a first "
                                     "token", namespace=ns, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Output tokens generated", namespace=ns,
                                         registry=r)
        self.vllm = VllmMetrics(r, model_name, _LATENCY_BUCKETS, _TPOT_BUCKETS)
        self._last_preemptions = self._last_prompt = self._last_generation = 0
        self._http: object | None = None
        self._http_thread: threading.Thread | None = None

    def observe_request(self, t: RequestTiming, reason: str) -> None:
        """Record a finished request, and log it as one INFO line (both front doors end here)."""
        ttft = f"{(t.first_token - t.arrival) * 1e3:.0f}ms" if t.first_token is not None else "-"
        request_log.info("request %s finished: %s; prompt %s tokens, output %d tokens; TTFT %s, E2E %.0fms",
                         t.request_id or "-", reason, "-" if t.prompt_tokens is None else t.prompt_tokens,
                         t.output_tokens, ttft, (t.finish - t.arrival) * 1e3)
        self.finished.labels(reason=reason).inc()
        self.vllm.finished(reason)
        for h in (self.e2e, self.vllm.e2e):
            h.observe(t.finish - t.arrival)
        if t.first_token is not None:
            for h in (self.ttft, self.vllm.ttft):
                h.observe(t.first_token - t.arrival)
            if t.output_tokens > 1:
                for h in (self.tpot, self.vllm.tpot):
                    h.observe((t.finish - t.first_token) / (t.output_tokens - 1))

    def update_engine(self, s: EngineStats) -> None:
        v = self.vllm
        for g, x in ((self.waiting, s.waiting), (v.waiting, s.waiting), (self.running, s.running),
                     (v.running, s.running), (v.swapped, s.swapped), (self.pages_used, s.pages_used),
                     (self.pages_total, s.pages_total)):
            g.set(x)
        usage = s.pages_used / s.pages_total if s.pages_total else 0.0
        v.gpu_cache_usage.set(usage)
        v.kv_cache_usage.set(usage)
        # The engine reports running totals; a Counter only goes up, so add the difference.
        self._last_preemptions = _add(s.preemptions, self._last_preemptions, self.preemptions, v.preemptions)
        self._last_prompt = _add(s.prompt_tokens_total, self._last_prompt, self.prompt_tokens,
                                 v.prompt_tokens)
        self._last_generation = _add(s.generation_tokens_total, self._last_generation, self.generation_tokens,
                                     v.generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (port 0 picks a free one); returns the bound port."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except (OSError, OverflowError) as e:  # busy, not an address here, or out of range
            reason = getattr(e, "strerror", None) or str(e)
            raise OSError(f"--metrics-port {port}: cannot serve metrics on {host}:{port}: {reason}") from None
        self._http, self._http_thread = server, thread
        return server.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _add(total: int, last: int, *counters: Counter) -> int:
    """Bring `counters` from the engine's earlier running total `last` to `total`; returns the new last."""
    if total > last:
        for c in counters:
            c.inc(total - last)
    return max(total, last)
