"""Issue 18 item 6: the periodic load line (vLLM's format) and vLLM-named metrics with token counters."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time

from jtrail.serving.engine.fake_runner import mock_engine
from jtrail.serving.engine_api import EngineStats
from jtrail.serving.frontdoor.metrics import ServerMetrics
from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig
from jtrail.serving.frontdoor.stats_log import StatsLogger
from prometheus_client.parser import text_string_to_metric_families

from jtrail.client import AsyncClient, Client

LINE = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                  r"Running: (\d+) reqs, Waiting: (\d+) reqs, KV cache usage: ([\d.]+)%, Preemptions: (\d+)")


def test_stats_line_rates_and_silence_while_idle(caplog) -> None:
    caplog.set_level(logging.INFO, logger="jtrail.stats")
    now = [100.0]
    s = EngineStats(pages_total=200)
    log = StatsLogger(lambda: s, interval_s=5.0, clock=lambda: now[0])
    now[0] += 5.0
    assert log.tick() is None  # idle from the start: nothing
    s = EngineStats(running=3, waiting=2, pages_used=50, pages_total=200, preemptions=1,
                    prompt_tokens_total=1000, generation_tokens_total=250)
    now[0] += 5.0
    m = LINE.fullmatch(log.tick())
    assert m and [float(x) for x in m.groups()] == [200.0, 50.0, 3, 2, 25.0, 1]
    s = EngineStats(pages_total=200, preemptions=1, prompt_tokens_total=1000, generation_tokens_total=260)
    now[0] += 2.0
    m = LINE.fullmatch(log.tick())  # tokens moved in this interval: still reported
    assert m and float(m.group(2)) == 5.0 and m.group(3) == "0"
    now[0] += 5.0
    assert LINE.fullmatch(log.tick())  # the first idle interval: one line saying so (0 tokens/s)
    now[0] += 5.0
    assert log.tick() is None  # then silence
    assert len([r for r in caplog.records if r.name == "jtrail.stats"]) == 3


def _scrape(text: str) -> dict[str, float]:
    """{'name{label=value,...}': value} for every sample."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}"] = smp.value
    return out


def test_vllm_named_metrics_and_token_counters() -> None:
    async def main() -> tuple[list[tuple[int, int]], dict[str, float]]:
        engine = mock_engine()
        # `jtrail serve` labels vLLM's names with the served model's name
        server = JtrailServer(engine, ServerConfig(port=0), metrics=ServerMetrics(model_name="m"))
        await server.start()
        usage = []
        async with AsyncClient(f"127.0.0.1:{server.port}") as c:
            for n in (4, 7):
                last = None
                async for d in c.generate("count the tokens please", max_tokens=n):
                    last = d
                usage.append((last.prompt_tokens, last.completion_tokens))
        await server.stop(grace_s=0.0)  # refreshes the gauges and counters from the engine's stats
        return usage, _scrape(server.metrics.render().decode())

    usage, m = asyncio.run(main())
    prompt, gen = sum(p for p, _ in usage), sum(g for _, g in usage)
    assert m["jtrail_prompt_tokens_total{}"] == prompt and m["jtrail_generation_tokens_total{}"] == gen
    # vLLM's names carry model_name; the counters agree with the clients' usage
    assert m["vllm:prompt_tokens_total{model_name=m}"] == prompt
    assert m["vllm:generation_tokens_total{model_name=m}"] == gen
    assert m["vllm:e2e_request_latency_seconds_count{model_name=m}"] == 2
    assert m["vllm:time_to_first_token_seconds_count{model_name=m}"] == 2
    assert m["vllm:time_per_output_token_seconds_count{model_name=m}"] == 2
    assert m["vllm:request_success_total{finished_reason=length,model_name=m}"] == 2
    for name in ("num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc",
                 "kv_cache_usage_perc"):
        assert m[f"vllm:{name}{{model_name=m}}"] == 0.0
    assert m["vllm:num_preemptions_total{model_name=m}"] == 0.0


def test_serve_logs_the_stats_line_while_busy() -> None:
    """A real `jtrail serve --mock` process: a stats line appears at INFO while a request runs."""
    cmd = [sys.executable, "-m", "jtrail.serve", "--mock", "--port", "0", "--no-http",
           "--mock-step-delay", "0.02", "--log-stats-interval", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        target = re.search(r"serving on (\S+) ", proc.stdout.readline()).group(1)
        with Client(target) as c:
            n = sum(len(d.token_ids) for d in c.generate("hello", max_tokens=60, timeout=30))
        assert n == 60
        time.sleep(0.7)  # one more tick: the idle line
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    lines = [ln for ln in err.splitlines() if "jtrail.stats INFO" in ln]
    assert lines, err
    matches = [LINE.search(ln) for ln in lines]
    assert all(matches), lines
    assert any(float(m.group(2)) > 0 for m in matches) and matches[-1].group(2) == "0.0", lines
