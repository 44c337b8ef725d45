"""A real `python -m jtrail.serve --mock` process on loopback: load, cancel, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from _procs import stop_gracefully
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from jtrail.client import AsyncClient, Client


@dataclass
class ServerProc:
    proc: subprocess.Popen
    target: str
    metrics_port: int | None


def _launch(*args: str, timeout: float = 20.0, mock: bool = True) -> ServerProc:
    cmd = [sys.executable, "-m", "jtrail.serve", *(["--mock"] if mock else []), "--host", "127.0.0.1",
           "--port", "0", "--no-http", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()  # "jtrail: serving on HOST:PORT metrics_port=N"; blocks until bound
    m = re.search(r"serving on ([\d.]+:\d+) metrics_port=(\S+)", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} (rc {proc.wait()})")
    target = m.group(1)
    with Client(target) as c:
        deadline = time.monotonic() + timeout
        while c.health(timeout=2.0) != "SERVING":  # the standard health service gates readiness
            assert time.monotonic() < deadline, "server never became SERVING"
            time.sleep(0.05)
    mp = None if m.group(2) == "None" else int(m.group(2))
    return ServerProc(proc, target, mp)


def _terminate(sp: ServerProc) -> int:
    return stop_gracefully(sp.proc, timeout=15)  # graceful path: drain, stop engine, exit 0


@pytest.fixture(scope="module")
def fast_server() -> Iterator[ServerProc]:
    sp = _launch("--slots", "32", "--pages", "2048", "--page-size", "8", "--max-queue", "400",
                 "--mock-step-delay", "0.002", "--metrics-port", "0")
    yield sp
    assert _terminate(sp) == 0


def test_200_concurrent_streams_complete_and_free_all_pages(fast_server: ServerProc) -> None:
    async def main() -> None:
        async with AsyncClient(fast_server.target) as c:
            async def one(i: int) -> tuple[int, int, str | None, int]:
                n, last = 0, None
                async for d in c.generate(f"request number {i}", max_tokens=8 + i % 25, timeout=60):
                    n += len(d.token_ids)
                    last = d
                return n, last.completion_tokens, last.finish_reason, 8 + i % 25

            results = await asyncio.gather(*(one(i) for i in range(200)))
            for n, completion, reason, want in results:
                assert (n, completion, reason) == (want, want, "length")
            s = await c.stats()
            # the real engine keeps page 0 as its null page: 2047 usable of --pages 2048
            assert (s.running, s.waiting, s.pages_used) == (0, 0, 0) and s.pages_total == 2047
            assert s.finished_by_reason["length"] >= 200

    asyncio.run(main())


def test_health_reflection_and_metrics(fast_server: ServerProc) -> None:
    with Client(fast_server.target) as c:
        assert c.health() == "SERVING" and c.health("jtrail.v1.Jtrail") == "SERVING"
        assert list(c.generate("warm", max_tokens=3))[-1].completion_tokens == 3
        db = ProtoReflectionDescriptorDatabase(c.channel)
        services = set(db.get_services())
        assert {"jtrail.v1.Jtrail", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("jtrail.v1.Jtrail")
        assert desc.package == "jtrail.v1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{fast_server.metrics_port}/metrics", timeout=5).read()
    text = text.decode()
    names = ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds")
    for name in names:
        m = re.search(rf"^jtrail_{name}_count (\S+)$", text, re.MULTILINE)
        assert m and float(m.group(1)) >= 1, name
        assert f'jtrail_{name}_bucket{{le="+Inf"}}' in text
    for gauge in ("requests_waiting", "requests_running", "kv_pages_used", "preemptions_total"):
        assert re.search(rf"^jtrail_{gauge} \S+$", text, re.MULTILINE), gauge
    assert re.search(r'^jtrail_requests_finished_total\{reason="length"\} \d', text, re.MULTILINE)


def test_cancel_frees_slot_within_one_step_and_queue_full() -> None:
    # Slow steps (100 ms) make "within one engine step" measurable over RPC round trips.
    sp = _launch("--slots", "2", "--max-queue", "1", "--mock-step-delay", "0.1")
    try:
        with Client(sp.target) as c:
            streams = [c.generate(f"long {i}", max_tokens=1000) for i in range(2)]
            for s in streams:
                next(s)  # both admitted and decoding
            queued = c.generate("queued", max_tokens=3)
            done: list = []
            t = threading.Thread(target=lambda: done.extend(queued), daemon=True)
            t.start()
            for _ in range(2000):
                if c.stats().waiting == 1:
                    break
                time.sleep(0.005)
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate("overflow", max_tokens=3))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            before = c.stats()
            assert before.running == 2 and before.pages_used > 0
            streams[0].close()  # client cancels mid-stream
            for _ in range(2000):
                s = c.stats()
                if s.finished_by_reason.get("cancelled", 0) == 1:
                    break
                # the engine thread applies the abort at the next step boundary (the step in flight
                # ends first) and publishes stats after the step that follows it
                assert s.steps <= before.steps + 2, "cancel not processed at the next step boundary"
                time.sleep(0.002)
            assert s.finished_by_reason["cancelled"] == 1 and s.steps <= before.steps + 2
            # the queued request takes the freed slot and finishes; the server keeps serving
            t.join(timeout=10)
            assert done and done[-1].finish_reason == "length" and done[-1].completion_tokens == 3
            streams[1].close()
            for _ in range(500):
                s = c.stats()
                if s.running == 0 and s.pages_used == 0:
                    break
                time.sleep(0.01)
            assert (s.running, s.waiting, s.pages_used) == (0, 0, 0)
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate("late", max_tokens=100, timeout=0.3))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            # SIGTERM drains: an in-flight stream still gets all its tokens, then the process exits 0.
            draining = c.generate("drain", max_tokens=8)
            first = next(draining)
            sp.proc.send_signal(signal.SIGTERM)
            rest = list(draining)
            assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) == 8
            assert rest[-1].finish_reason == "length"
            assert sp.proc.wait(timeout=15) == 0
    finally:
        if sp.proc.poll() is None:
            _terminate(sp)


def test_unknown_policy_exits_nonzero_naming_it() -> None:
    r = subprocess.run([sys.executable, "-m", "jtrail.serve", "--mock", "--port", "0", "--policy",
                        "no-such-policy"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "no-such-policy" in r.stderr and "policy" in r.stderr
