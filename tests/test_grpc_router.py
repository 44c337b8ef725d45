"""`jtrail route` in front of two real `jtrail serve --mock` processes on loopback: the router speaks
the server's API, spreads load by policy, passes errors through and frees replica pages on cancel."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from _procs import stop_gracefully
from test_grpc_process import ServerProc, _launch, _terminate

from jtrail.client import AsyncClient, Client

REPLICA_ARGS = ("--slots", "4", "--pages", "256", "--page-size", "8", "--mock-step-delay", "0.005")


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerProc]]:
    sps = [_launch(*REPLICA_ARGS), _launch(*REPLICA_ARGS)]
    yield sps
    for sp in sps:
        _terminate(sp)


def _route(replicas: list[ServerProc], router: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "jtrail.cli", "route", "--replicas", ",".join(r.target for r in replicas),
           "--router", router, "--port", "0", "--page-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    m = re.search(r"routing on ([\d.]+:\d+)", proc.stdout.readline())
    assert m, f"router did not start (rc {proc.poll()})"
    return proc, m.group(1)


def _finished(target: str) -> int:
    with Client(target) as c:
        return sum(c.stats().finished_by_reason.values())


def _stop(proc: subprocess.Popen) -> None:
    stop_gracefully(proc, timeout=15)


def test_round_robin_spreads_evenly_and_passes_errors(replicas: list[ServerProc]) -> None:
    proc, target = _route(replicas, "round-robin")
    try:
        before = [_finished(r.target) for r in replicas]
        with Client(target) as c:
            assert "round-robin over 2 x" in c.server_info().policy
            for i in range(10):
                deltas = list(c.generate(f"hello {i}", max_tokens=5, timeout=30))
                assert sum(len(d.token_ids) for d in deltas) == 5
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate("bad", temperature=-1.0, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
        after = [_finished(r.target) for r in replicas]
        assert [a - b for a, b in zip(after, before, strict=True)] == [5, 5]
    finally:
        _stop(proc)


def test_token_aware_avoids_the_loaded_replica_and_cancel_frees_pages(replicas: list[ServerProc]) -> None:
    proc, target = _route(replicas, "token-aware")

    async def main() -> None:
        busy, idle = replicas
        async with AsyncClient(busy.target) as direct, AsyncClient(idle.target) as idle_c, \
                AsyncClient(target) as routed:
            async def long_stream() -> None:  # load the first replica directly, not through the router
                async for _ in direct.generate("long " * 50, max_tokens=300, timeout=60):
                    pass

            loaders = [asyncio.create_task(long_stream()) for _ in range(6)]
            deadline = time.monotonic() + 10
            while (await direct.stats()).running < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # the router's poll sees the load
            before_idle = _finished(idle.target)
            for i in range(6):
                n = 0
                async for d in routed.generate(f"short {i}", max_tokens=4, timeout=30):
                    n += len(d.token_ids)
                assert n == 4
            assert _finished(idle.target) - before_idle == 6  # every short request went to the idle one

            async for _ in routed.generate("cancel me " * 20, max_tokens=500, timeout=30):
                break  # leaving the stream cancels through the router
            for t in loaders:
                t.cancel()
            await asyncio.gather(*loaders, return_exceptions=True)
            deadline = time.monotonic() + 10
            while True:
                stats = [await direct.stats(), await idle_c.stats()]
                if all(s.pages_used == 0 and s.running == 0 for s in stats):
                    break
                assert time.monotonic() < deadline, f"replica pages not freed: {stats}"
                await asyncio.sleep(0.05)

    try:
        asyncio.run(main())
    finally:
        _stop(proc)
