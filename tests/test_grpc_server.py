"""The server object in-process (the engine over the fake runner): streaming, status mapping,
deadlines, drain on shutdown."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from jtrail.serving.engine.async_engine import AsyncLLMEngine
from jtrail.serving.engine.fake_runner import encode_text, fake_token, mock_engine
from jtrail.serving.frontdoor.proto import jtrail_v1_pb2 as pb
from jtrail.serving.frontdoor.proto import jtrail_v1_pb2_grpc as pb_grpc
from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig
from jtrail.serving.sequence import RequestOutput, SamplingParams

from jtrail.client import AsyncClient


class FailingEngine(AsyncLLMEngine):
    """Blows up on the prompt "boom" (after validation), like an engine bug would."""

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        if prompt_ids == encode_text("boom"):
            raise RuntimeError("kaput")
        async for out in super().generate(request_id, prompt_ids, params, priority):
            yield out


async def _start(engine: AsyncLLMEngine, **cfg) -> tuple[JtrailServer, AsyncClient]:
    server = JtrailServer(engine, ServerConfig(port=0, stats_interval_s=0.05, **cfg))
    await server.start()
    return server, AsyncClient(f"127.0.0.1:{server.port}")


async def _status(agen) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        async for _ in agen:
            pass
    return e.value


async def _wait_idle(client: AsyncClient, timeout: float = 3.0) -> pb.StatsResponse:
    for _ in range(int(timeout / 0.01)):
        s = await client.stats()
        if s.running == 0 and s.waiting == 0 and s.pages_used == 0:
            return s
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine never went idle: {s}")


def test_stream_info_and_invalid_arguments() -> None:
    async def main() -> None:
        engine = mock_engine(max_model_len=64, step_delay_s=0.0, num_pages=64, page_size=4)
        server, c = await _start(engine, max_queue=7)
        try:
            deltas = [d async for d in c.generate("hi there", max_tokens=9)]
            ids = [t for d in deltas for t in d.token_ids]
            assert ids == [fake_token(encode_text("hi there"), k) for k in range(9)]
            assert [d.finish_reason for d in deltas] == [None] * 8 + ["length"]
            assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (8, 9)
            assert deltas[0].remaining_estimate == 8.0
            chat = [d async for d in c.generate([{"role": "user", "content": "yo"}], max_tokens=2)]
            assert chat[-1].completion_tokens == 2 and chat[-1].prompt_tokens > 2
            info = await c.server_info()
            assert (info.model, info.max_model_len, info.policy, info.max_queue) == ("mock", 64, "fcfs", 7)
            assert info.stats.finished_by_reason["length"] == 2

            cases = [(("",), {}, "prompt"), (([],), {}, "prompt"),
                     (("hi",), {"max_tokens": -1}, "max_tokens"), (("hi",), {"max_tokens": 0}, "max_tokens"),
                     (("hi",), {"max_tokens": 10**9}, "max_tokens"),
                     (("hi",), {"temperature": -0.5}, "temperature"),
                     (("hi",), {"top_p": 0.0}, "top_p"), (("hi",), {"top_p": 1.5}, "top_p"),
                     (("x" * 100,), {}, "prompt"), (([10**6],), {}, "prompt.token_ids")]
            for args, kw, field in cases:
                err = await _status(c.generate(*args, **kw))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (args, kw, err)
                assert f"{field}:" in err.details(), (field, err.details())
            empty = pb_grpc.JtrailStub(c.channel).Generate(pb.GenerateRequest())  # no prompt at all
            err = await _status(empty)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.details()
            assert (await c.health()) == "SERVING"
            text = server.metrics.render().decode()
            assert 'jtrail_requests_finished_total{reason="length"} 2.0' in text
            assert "jtrail_time_to_first_token_seconds_count 2.0" in text
            assert 'jtrail_requests_rejected_total{code="INVALID_ARGUMENT"} 11.0' in text
        finally:
            await c.close()
            await server.stop(0.5)

    asyncio.run(main())


def test_deadline_queue_full_engine_error_and_recovery() -> None:
    async def main() -> None:
        inner = mock_engine(num_slots=1, max_queue=1, step_delay_s=0.01).engine
        engine = FailingEngine(inner, model_name="mock")
        server, c = await _start(engine)
        try:
            err = await _status(c.generate("slow", max_tokens=500, timeout=0.15))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _wait_idle(c)  # the server aborted the request in the engine

            running = c.generate("a", max_tokens=500)
            await anext(running)
            queued = c.generate("b", max_tokens=500)
            queued_first = asyncio.create_task(anext(queued))
            for _ in range(300):
                if (await c.stats()).waiting == 1:
                    break
                await asyncio.sleep(0.01)
            err = await _status(c.generate("c", max_tokens=5))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            await running.aclose()  # client cancels: its slot goes to the queued request
            await queued_first
            await queued.aclose()
            await _wait_idle(c)

            err = await _status(c.generate("boom", max_tokens=5))
            assert err.code() == grpc.StatusCode.INTERNAL and "kaput" in err.details()
            ok = [d async for d in c.generate("fine", max_tokens=3)]  # still serving
            assert ok[-1].finish_reason == "length" and ok[-1].completion_tokens == 3
            assert (await c.stats()).finished_by_reason["cancelled"] == 3
        finally:
            await c.close()
            await server.stop(0.5)

    asyncio.run(main())


def test_graceful_shutdown_drains_in_flight_stream() -> None:
    async def main() -> None:
        server, c = await _start(mock_engine(step_delay_s=0.01))
        try:
            stream = c.generate("drain me", max_tokens=30)
            first = await anext(stream)
            stopping = asyncio.create_task(server.stop(grace_s=10.0))
            rest = [d async for d in stream]
            assert [first, *rest][-1].completion_tokens == 30 and rest[-1].finish_reason == "length"
            await stopping
            err = await _status(c.generate("late", max_tokens=2, timeout=2.0))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await c.close()
            await server.stop(0.1)

    asyncio.run(main())


@pytest.mark.parametrize("policy,mode,want", [("fcfs", "keep", ["long", "l40", "l20", "l10"]),
                                              ("trail", "keep", ["l10", "l20", "l40", "long"]),
                                              ("trail", "recompute", ["long", "l10", "l20", "l40"])])
def test_serve_mock_runs_the_named_policy(policy, mode, want) -> None:
    """`jtrail serve --mock --policy trail` schedules with trail: one slot, a long request running,
    three shorter ones arriving behind it, each 4 steps after the one before. Under the default "keep"
    preemption each shorter arrival preempts the running request (trail's c = 0.5: it has generated
    well under half its estimate), so they finish shortest first and the long one last; under
    recompute trail runs without preemption (the engine tells it the mode; the long one keeps its slot,
    the queue runs shortest first); fcfs finishes them in arrival order."""
    import argparse

    from jtrail.serve import add_serve_args, build_engine

    p = argparse.ArgumentParser()
    add_serve_args(p)
    engine = build_engine(p.parse_args(["--mock", "--policy", policy, "--slots", "1",
                                        "--preemption-mode", mode, "--mock-step-delay", "0.005"]))
    assert engine.info().policy == policy

    async def main() -> None:
        server, c = await _start(engine)
        order: list[str] = []

        async def run(name: str, n: int) -> None:
            async for d in c.generate(name, max_tokens=n):
                if d.finish_reason:
                    order.append(name)

        try:
            long = asyncio.create_task(run("long", 200))
            while (await c.stats()).running == 0:
                await asyncio.sleep(0.005)
            tasks = []
            for name, n in (("l40", 40), ("l20", 20), ("l10", 10)):
                tasks.append(asyncio.create_task(run(name, n)))
                await asyncio.sleep(0.02)  # arrival order fixed
            await asyncio.gather(long, *tasks)
            assert order == want
        finally:
            await c.close()
            await server.stop(0.5)

    asyncio.run(main())
