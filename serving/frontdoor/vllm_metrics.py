"""vLLM-compatible names for the server's metrics, so that dashboards and alerts built for vLLM work.

vLLM (v0.6 - v0.11) exports `vllm:`-prefixed metrics with a `model_name` label; this registers the
ones jtrail can fill with the same meaning, next to jtrail's own `jtrail_*` metrics in the same
registry. `vllm:gpu_cache_usage_perc` (vLLM v0) and `vllm:kv_cache_usage_perc` (v1) are both kept: a
fraction in [0, 1] as vLLM exports it, despite the name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's finished_reason label values: a cancelled request is an "abort" there
_REASON = {"cancelled": "abort"}


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, latency_buckets: tuple[float, ...],
                 tpot_buckets: tuple[float, ...]) -> None:
        m, r = ["model_name"], registry
        self._model = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"vllm:{name}", doc, m, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"vllm:{name}", doc, m, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"vllm:{name}", doc, m, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the batch (running)")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.swapped = gauge("num_requests_swapped", "Requests swapped out to host memory")
        self.gpu_cache_usage = gauge("gpu_cache_usage_perc", "KV cache usage, fraction 0-1 (vLLM v0 name)")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "KV cache usage, fraction 0-1 (vLLM v1 name)")
        self.preemptions = counter("num_preemptions", "Cumulative preemptions")
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.ttft = hist("time_to_first_token_seconds", "Time to first token", latency_buckets)
        self.tpot = hist("time_per_output_token_seconds", "Time per output token after the first",
                         tpot_buckets)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency", latency_buckets)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason",
                                ["model_name", "finished_reason"], registry=r)

    def finished(self, reason: str) -> None:
        self._success.labels(self._model, _REASON.get(reason, reason)).inc()
