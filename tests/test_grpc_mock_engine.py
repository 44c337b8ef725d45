"""MockEngine: deterministic tokens, slot/page accounting, queue limit, cancellation, preemption."""

import asyncio

import pytest
from jtrail.serving.mock_engine import MockEngine, MockEngineConfig, decode_ids, encode_text, fake_token
from jtrail.serving.sequence import FinishReason, InvalidRequestError, QueueFullError, SamplingParams


async def _collect(engine: MockEngine, rid: str, prompt: list[int], n: int) -> list:
    return [o async for o in engine.generate(rid, prompt, SamplingParams(max_tokens=n))]


def test_tokens_counts_and_pages_return() -> None:
    async def main() -> None:
        eng = MockEngine(MockEngineConfig(num_slots=3, num_pages=40, page_size=4, step_delay_s=0.0))
        await eng.start()
        prompts = [encode_text(f"prompt {i}") for i in range(10)]
        outs = await asyncio.gather(*(_collect(eng, f"r{i}", p, 5 + i) for i, p in enumerate(prompts)))
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            ids = [t for x in o for t in x.new_token_ids]
            assert ids == [fake_token(p, k) for k in range(5 + i)]
            assert o[-1].finished and o[-1].finish_reason is FinishReason.LENGTH
            assert o[-1].completion_tokens == 5 + i and o[-1].prompt_tokens == len(p)
            assert "".join(x.new_text for x in o) == decode_ids(ids)
        s = eng.stats()
        assert (s.running, s.waiting, s.pages_used) == (0, 0, 0)
        assert s.finished_by_reason == {"length": 10}
        await eng.shutdown(0.0)

    asyncio.run(main())


def test_page_pressure_preempts_and_still_finishes() -> None:
    async def main() -> None:
        # 4 slots but pages for only ~2 long requests: growth must preempt (recompute) and resume.
        eng = MockEngine(MockEngineConfig(num_slots=4, num_pages=10, page_size=4, step_delay_s=0.0))
        await eng.start()
        outs = await asyncio.gather(*(_collect(eng, f"r{i}", [10, 11, 12], 14) for i in range(4)))
        assert all(o[-1].completion_tokens == 14 for o in outs)
        s = eng.stats()
        assert s.preemptions > 0 and s.pages_used == 0
        await eng.shutdown(0.0)

    asyncio.run(main())


def test_validation_queue_full_and_cancel() -> None:
    async def main() -> None:
        eng = MockEngine(MockEngineConfig(num_slots=1, num_pages=64, page_size=4, max_queue=1,
                                          step_delay_s=0.01, max_context=64))
        await eng.start()
        with pytest.raises(InvalidRequestError) as e:
            await anext(eng.generate("bad", [], SamplingParams(max_tokens=4)))
        assert e.value.field == "prompt"
        with pytest.raises(InvalidRequestError) as e:
            await anext(eng.generate("bad", [5] * 60, SamplingParams(max_tokens=10)))
        assert e.value.field == "max_tokens"
        running = eng.generate("a", [5, 6], SamplingParams(max_tokens=50))
        await anext(running)  # admitted and decoding
        with pytest.raises(InvalidRequestError) as e:
            await anext(eng.generate("a", [5, 6], SamplingParams(max_tokens=5)))
        assert e.value.field == "request_id"
        queued = eng.generate("b", [5, 6], SamplingParams(max_tokens=50))
        queued_task = asyncio.create_task(anext(queued))
        await asyncio.sleep(0.02)
        assert eng.stats().waiting == 1
        with pytest.raises(QueueFullError):
            await anext(eng.generate("c", [5, 6], SamplingParams(max_tokens=5)))
        step = eng.steps
        await running.aclose()  # the client went away
        s = eng.stats()
        assert eng.steps == step and s.running == 0 and s.pages_used == 0  # freed at once, not next step
        first = await queued_task  # the queued request now gets the slot
        assert first.new_token_ids
        await eng.abort("b")
        rest = [o async for o in queued]
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        assert eng.stats().finished_by_reason == {"cancelled": 2}
        await eng.shutdown(0.0)

    asyncio.run(main())
