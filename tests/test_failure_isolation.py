"""Issue 14, items 1-2: one bad request must never take the server down.

An error tied to one request fails that request alone (naming it) and the engine serves on; a step
that fails without naming a request fails that step's requests only; a dead engine loop turns health
NOT_SERVING and every open and new request into UNAVAILABLE (never a hang), and `jtrail serve` exits
non-zero. Queue-full is always RESOURCE_EXHAUSTED, however the front end's check races the engine.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import grpc
import jax.numpy as jnp
import pytest
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.serving.engine import async_engine as ae
from jtrail.serving.engine.async_engine import AsyncLLMEngine
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.engine_api import EngineStats
from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig
from jtrail.serving.sequence import (
    EngineDeadError,
    FinishReason,
    QueueFullError,
    RequestFailedError,
    SamplingParams,
)

from jtrail.client import AsyncClient, Client

CFG = NAMED_CONFIGS["tiny"].replace(tie_embeddings=False)
P = SamplingParams(max_tokens=6, ignore_eos=True)


class ByteTok:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("latin-1"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(7))


def make(model: Llama, **kw) -> AsyncLLMEngine:
    cfg = dict(num_slots=4, page_size=4, num_pages=64, max_model_len=64, prefill_buckets=(8, 16),
               max_prefill_tokens_per_step=16, kernel_impl="reference")
    max_queue = kw.pop("front_max_queue", None)
    cfg.update(kw)
    return AsyncLLMEngine(LLMEngine(model, ByteTok(), EngineConfig(**cfg)), max_queue=max_queue)


async def run(eng: AsyncLLMEngine, rid: str, prompt: list[int], params: SamplingParams = P):
    """(tokens, finish reason) or the exception the stream raised."""
    toks = []
    try:
        async for out in eng.generate(rid, prompt, params):
            toks += out.new_token_ids
        return toks, out.finish_reason
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


def idle(eng: AsyncLLMEngine) -> bool:
    s = eng.engine.stats()
    return not eng.engine.has_unfinished() and s.pages_used == 0 and not eng.engine.requests


def test_add_request_error_fails_that_request_alone(model: Llama, monkeypatch) -> None:
    async def main() -> None:
        eng = make(model)
        real_add = eng.engine.add_request

        def add(rid, *a, **kw):
            if rid == "bad":
                real_add(rid, *a, **kw)  # half-registered, then blows up
                raise KeyError("detokenizer exploded")
            return real_add(rid, *a, **kw)

        monkeypatch.setattr(eng.engine, "add_request", add)
        await eng.start()
        good, bad = await asyncio.gather(run(eng, "good", [65, 66, 67]), run(eng, "bad", [65, 66]))
        assert good[1] is FinishReason.LENGTH and len(good[0]) == 6
        assert isinstance(bad, RequestFailedError) and "'bad'" in str(bad) and "KeyError" in str(bad)
        assert (await run(eng, "after", [70, 71]))[1] is FinishReason.LENGTH
        assert idle(eng) and eng.error is None
        await eng.shutdown(1.0)

    asyncio.run(main())


def test_step_error_naming_a_request_fails_it_alone(model: Llama, monkeypatch) -> None:
    async def main() -> None:
        eng = make(model)
        real_step = eng.engine.step
        fired = []

        def step():
            if "victim" in eng.engine.requests and not fired:
                fired.append(1)
                raise RequestFailedError("victim", "stop-string check failed")
            return real_step()

        monkeypatch.setattr(eng.engine, "step", step)
        await eng.start()
        other, victim = await asyncio.gather(run(eng, "other", [65, 66, 67]), run(eng, "victim", [68]))
        assert other[1] is FinishReason.LENGTH and len(other[0]) == 6
        assert isinstance(victim, RequestFailedError) and "'victim'" in str(victim)
        assert idle(eng) and eng.error is None
        await eng.shutdown(1.0)

    asyncio.run(main())


def test_unattributed_step_error_fails_that_steps_requests_and_serves_on(model: Llama, monkeypatch) -> None:
    async def main() -> None:
        eng = make(model, num_slots=1)
        real_step = eng.engine.step
        fired = []

        def step():
            outs = real_step()
            if eng.engine.running and eng.engine.running[0].num_generated >= 2 and not fired:
                fired.append(1)
                raise RuntimeError("XLA went sideways")  # after the step mutated state
            return outs

        monkeypatch.setattr(eng.engine, "step", step)
        await eng.start()
        long = SamplingParams(max_tokens=20, ignore_eos=True)
        first = asyncio.create_task(run(eng, "first", [65] * 5, long))
        await asyncio.sleep(0)
        queued = asyncio.create_task(run(eng, "queued", [66] * 3))  # waits for the only slot
        first, queued = await first, await queued
        assert isinstance(first, RequestFailedError) and "'first'" in str(first) and "XLA" in str(first)
        assert queued[1] is FinishReason.LENGTH and len(queued[0]) == 6  # not in the failed step
        assert idle(eng) and eng.error is None
        await eng.shutdown(1.0)

    asyncio.run(main())


def test_dead_engine_loop_fails_every_stream_and_request_and_health(model: Llama, monkeypatch) -> None:
    async def main() -> None:
        eng = make(model)
        real_stats = eng.engine.stats

        def stats():
            if eng.engine.steps >= 3:
                raise RuntimeError("device lost")  # outside a step: the loop itself dies
            return real_stats()

        monkeypatch.setattr(eng.engine, "stats", stats)
        server = JtrailServer(eng, ServerConfig(port=0, stats_interval_s=0.05))
        await server.start()
        c = AsyncClient(f"127.0.0.1:{server.port}")
        try:
            assert await c.health() == "SERVING"
            t0 = time.monotonic()
            streams = [c.generate(f"stream {i}", max_tokens=40, ignore_eos=True) for i in range(3)]
            codes = []
            for s in streams:
                with pytest.raises(grpc.RpcError) as e:
                    async for _ in s:
                        pass
                codes.append(e.value.code())
            assert codes == [grpc.StatusCode.UNAVAILABLE] * 3 and time.monotonic() - t0 < 30
            assert isinstance(eng.error, RuntimeError) and server.fatal_error is eng.error
            for _ in range(100):
                if await c.health() == "NOT_SERVING":
                    break
                await asyncio.sleep(0.01)
            assert await c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                async for _ in c.generate("new", max_tokens=2, timeout=10):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(EngineDeadError):
                await anext(eng.generate("direct", [65], P))
        finally:
            await c.close()
            await server.stop(0.5)

    asyncio.run(main())


def test_queue_full_is_resource_exhausted_when_the_front_check_races(model: Llama, monkeypatch) -> None:
    """The front end counts waiting requests from a per-step stats snapshot; the engine thread takes
    submitted requests before the next snapshot, so both can miss a request and the engine's own check
    rejects it. That rejection must be QueueFullError (RESOURCE_EXHAUSTED), not an engine error."""

    async def main() -> None:
        eng = make(model, num_slots=1, max_queue=3)
        await eng.start()
        monkeypatch.setattr(eng, "_stats", EngineStats())  # a snapshot that lags behind
        monkeypatch.setattr(eng.engine, "stats", lambda: EngineStats())
        results = []
        for wave in range(4):  # waves: the engine thread takes each wave between snapshots
            results += await asyncio.gather(*(run(eng, f"w{wave}-{i}", [65 + i] * 3) for i in range(12)))
        ok = [r for r in results if isinstance(r, tuple)]
        full = [r for r in results if isinstance(r, QueueFullError)]
        others = [r for r in results if not isinstance(r, tuple | QueueFullError)]
        assert not others, others
        assert full and ok and all(r[1] is FinishReason.LENGTH for r in ok)
        await eng.shutdown(1.0)

    asyncio.run(main())


def test_queue_full_under_load_over_grpc(model: Llama) -> None:
    async def main() -> None:
        eng = make(model, num_slots=2, front_max_queue=4, max_queue=4)
        server = JtrailServer(eng, ServerConfig(port=0))
        await server.start()
        codes: dict[str, int] = {}
        async with AsyncClient(f"127.0.0.1:{server.port}") as c:
            async def one(i: int) -> None:
                try:
                    async for _ in c.generate([65 + i % 20] * 4, max_tokens=3, ignore_eos=True, timeout=60):
                        pass
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                codes[code] = codes.get(code, 0) + 1

            for _ in range(4):
                await asyncio.gather(*(one(i) for i in range(50)))
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
            assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0
        await server.stop(0.5)

    asyncio.run(main())


DYING_SERVER = """
import sys
from jtrail.serving.engine.llm_engine import LLMEngine
real = LLMEngine.stats
def stats(self):  # called by the engine loop outside any step: raising there kills the loop
    if any(s.prompt_ids[:3] == [68, 73, 69] for s in self.waiting + self.running):  # "DIE"
        raise RuntimeError("simulated device loss")
    return real(self)
LLMEngine.stats = stats
from jtrail.serve import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_process_exits_nonzero_when_the_engine_dies() -> None:
    # --no-warmup: this test is about the loop dying, not start-up (warm-up compiles every prefill
    # bucket, ~3x the one the first request needs; warm-up is tested in test_warmup.py)
    proc = subprocess.Popen(
        [sys.executable, "-c", DYING_SERVER, "--model", "tiny", "--policy", "fcfs", "--probe", "none",
         "--port", "0", "--slots", "2", "--pages", "64", "--max-context", "64", "--max-tokens", "8",
         "--no-warmup"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        m = re.search(r"serving on ([\d.]+:\d+)", proc.stdout.readline())
        assert m, proc.stderr.read() if proc.poll() is not None else "no serving line"
        with Client(m.group(1)) as c:
            assert list(c.generate("ok", max_tokens=2, timeout=60))[-1].completion_tokens == 2
            codes = []
            for text in ("DIE now", "after"):
                with pytest.raises(grpc.RpcError) as e:
                    list(c.generate(text, max_tokens=4, timeout=60))
                codes.append(e.value.code())
        # the loop is dead: this stream and every later request get UNAVAILABLE; the process exits 1
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 2, (codes, e.value.details())
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
        assert "engine loop died" in err and "simulated device loss" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_max_failed_steps_is_small() -> None:
    assert 1 < ae.MAX_FAILED_STEPS <= 5
