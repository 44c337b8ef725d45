"""The mock engine (`fake_runner.mock_engine`): the real engine and policies over the fake runner.
Deterministic tokens, slot/page accounting, queue limit, cancellation, preemption, and the real
policy: trail runs shortest-predicted first."""

import asyncio

import pytest
from jtrail.serving.engine.batch import StepBatch
from jtrail.serving.engine.fake_runner import (
    ByteTokenizer,
    FakeRunner,
    decode_ids,
    encode_text,
    fake_token,
    mock_engine,
)
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import FinishReason, InvalidRequestError, QueueFullError, SamplingParams


async def _collect(engine, rid: str, prompt: list[int], n: int) -> list:
    return [o async for o in engine.generate(rid, prompt, SamplingParams(max_tokens=n))]


async def _idle(engine, timeout: float = 5.0):
    for _ in range(int(timeout / 0.005)):
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.pages_used == 0:
            return s
        await asyncio.sleep(0.005)
    raise AssertionError(f"never idle: {engine.stats()}")


def test_tokens_counts_and_pages_return() -> None:
    async def main() -> None:
        eng = mock_engine(num_slots=3, num_pages=40, page_size=4, step_delay_s=0.0)
        await eng.start()
        prompts = [encode_text(f"prompt {i}") for i in range(10)]
        outs = await asyncio.gather(*(_collect(eng, f"r{i}", p, 5 + i) for i, p in enumerate(prompts)))
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            ids = [t for x in o for t in x.new_token_ids]
            assert ids == [fake_token(p, k) for k in range(5 + i)]
            assert o[-1].finished and o[-1].finish_reason is FinishReason.LENGTH
            assert o[-1].completion_tokens == 5 + i and o[-1].prompt_tokens == len(p)
            assert "".join(x.new_text for x in o) == decode_ids(ids)
        s = await _idle(eng)
        assert s.finished_by_reason == {"length": 10}
        await eng.shutdown(0.0)

    asyncio.run(main())


def test_page_pressure_preempts_and_still_finishes() -> None:
    async def main() -> None:
        # 4 slots but pages for only ~2 long requests: growth must preempt (recompute) and resume.
        eng = mock_engine(num_slots=4, num_pages=11, page_size=4, step_delay_s=0.0)
        await eng.start()
        outs = await asyncio.gather(*(_collect(eng, f"r{i}", [10, 11, 12], 14) for i in range(4)))
        for o in outs:
            assert o[-1].completion_tokens == 14
            assert [t for x in o for t in x.new_token_ids] == [fake_token([10, 11, 12], k) for k in range(14)]
        s = await _idle(eng)
        assert s.preemptions > 0
        await eng.shutdown(0.0)

    asyncio.run(main())


def test_validation_queue_full_and_cancel() -> None:
    async def main() -> None:
        eng = mock_engine(num_slots=1, num_pages=64, page_size=4, max_queue=1, step_delay_s=0.01,
                          max_model_len=64)
        await eng.start()
        with pytest.raises(InvalidRequestError) as e:
            await anext(eng.generate("bad", [], SamplingParams(max_tokens=4)))
        assert e.value.field == "prompt"
        with pytest.raises(InvalidRequestError) as e:
            await anext(eng.generate("bad", [5] * 64, SamplingParams(max_tokens=10)))
        assert e.value.field == "prompt"
        running = eng.generate("a", [5, 6], SamplingParams(max_tokens=500))
        await anext(running)  # admitted and decoding
        with pytest.raises(InvalidRequestError) as e:
            await anext(eng.generate("a", [5, 6], SamplingParams(max_tokens=5)))
        assert e.value.field == "request_id"
        queued = eng.generate("b", [5, 6], SamplingParams(max_tokens=500))
        queued_task = asyncio.create_task(anext(queued))
        await asyncio.sleep(0.05)
        assert eng.stats().waiting == 1
        with pytest.raises(QueueFullError):
            await anext(eng.generate("c", [5, 6], SamplingParams(max_tokens=5)))
        await running.aclose()  # the client went away: its slot goes to the queued request
        first = await asyncio.wait_for(queued_task, 5.0)
        assert first.new_token_ids
        await eng.abort("b")
        rest = [o async for o in queued]
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        s = await _idle(eng)
        assert s.finished_by_reason == {"cancelled": 2}
        await eng.shutdown(0.0)

    asyncio.run(main())


def _fake_engine(policy: str, policy_kw: dict | None = None, **kw) -> LLMEngine:
    from jtrail.serving.brain.scheduler.registry import make_policy
    from jtrail.serving.engine.fake_runner import FakeLengthPredictor

    cfg = EngineConfig(num_slots=kw.get("slots", 2), num_pages=64, page_size=4, max_model_len=256,
                       policy=make_policy(policy, **(policy_kw or {})))
    runner = FakeRunner(cfg.num_slots, cfg.max_model_len, cfg.page_size, probe=True)
    return LLMEngine(None, ByteTokenizer(), cfg, predictor=FakeLengthPredictor(), runner=runner)


# aging off: these arrivals are a second apart, and trail's default credit (100 tokens/s) would order
# them by arrival, which is what it is for (test_scheduler.py covers aging)
@pytest.mark.parametrize("policy,kw", [
    ("fcfs", {}), ("trail", {"aging": 0.0}), ("trail", {"c": 0.0, "aging": 0.0}),
    ("trail", {"c": 0.8, "aging": 0.0})])
def test_real_policy_runs_over_the_fake_runner(policy, kw) -> None:
    """One slot, requests queued in order of decreasing length: fcfs finishes them in arrival order,
    trail (probe-only prefills give the waiting requests their lengths) shortest first."""
    eng = _fake_engine(policy, kw, slots=1)
    lengths = [40, 30, 20, 10, 5]
    for i, n in enumerate(lengths):
        eng.add_request(f"r{i}", encode_text(f"q{i}"), SamplingParams(max_tokens=n), arrival_time=float(i))
    order = []
    while eng.has_unfinished():
        order += [o.request_id for o in eng.step() if o.finished]
    if policy == "fcfs":
        assert order == ["r0", "r1", "r2", "r3", "r4"]
        assert eng.num_preemptions == 0
    elif kw.get("c") == 0.0:  # never preempts: r0 keeps the slot it took, then SRPT order
        assert order == ["r0", "r4", "r3", "r2", "r1"]
        assert eng.num_preemptions == 0
    else:  # (default c = 0.5) r0 took the free slot before any length was known; the shorter ones preempt
        assert order == ["r4", "r3", "r2", "r1", "r0"]  # it (SRPT), at most twice (max_preemptions 2)
        assert 1 <= eng.num_preemptions <= (2 if "c" not in kw else 4)


def test_a_step_makes_at_most_two_runner_calls() -> None:
    """Admitting N requests (with probe-only prefills of the ones that wait) is one prefill call."""
    eng = _fake_engine("trail", slots=4)
    calls = []
    orig = eng.runner.execute

    def counting(batch: StepBatch):
        before = eng.runner.calls
        out = orig(batch)
        calls.append((eng.runner.calls - before, len(batch.prefills), len(batch.decodes)))
        return out

    eng.runner.execute = counting
    for i in range(7):
        eng.add_request(f"r{i}", encode_text(f"prompt {i}"), SamplingParams(max_tokens=3 + i))
    while eng.has_unfinished():
        eng.step()
    assert calls[0] == (1, 7, 0)  # 4 admitted + 3 probed: one call
    assert all(c <= 2 for c, _, _ in calls)
