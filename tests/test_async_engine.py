"""AsyncLLMEngine: concurrent streams equal the synchronous engine's tokens, cancel frees resources,
bad input and a full queue raise typed errors before the first output."""

from __future__ import annotations

import asyncio

import jax.numpy as jnp
import pytest
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.serving.engine.async_engine import AsyncLLMEngine
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import FinishReason, InvalidRequestError, QueueFullError, SamplingParams

CFG = NAMED_CONFIGS["tiny"].replace(tie_embeddings=False)


class ByteTok:
    """Duck-typed tokenizer: token id i <-> byte i (ids >= 128 decode as replacement chars)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("latin-1"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def make_engine(**kw) -> LLMEngine:
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(7))
    cfg = dict(num_slots=4, page_size=4, num_pages=64, max_model_len=64, prefill_buckets=(8, 16),
               max_prefill_tokens_per_step=16, decode_steps_per_call=2, kernel_impl="reference")
    cfg.update(kw)
    return LLMEngine(model, ByteTok(), EngineConfig(**cfg))


def test_streams_match_sync_engine():
    prompts = [[65 + i, 66, 67, 68 + i] * (i + 1) for i in range(6)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [s.output_ids for s in make_engine().generate_batch(prompts, params, progress=False)]

    async def main():
        eng = AsyncLLMEngine(make_engine())
        await eng.start()

        async def consume(i):
            toks, text, outs = [], "", []
            async for out in eng.generate(f"r{i}", prompts[i], params):
                toks += out.new_token_ids
                text += out.new_text
                outs.append(out)
            return toks, text, outs

        results = await asyncio.gather(*(consume(i) for i in range(len(prompts))))
        stats = eng.stats()
        await eng.shutdown(1.0)
        return results, stats

    results, stats = asyncio.run(main())
    for (toks, text, outs), exp in zip(results, expected, strict=True):
        assert toks == exp
        assert text == ByteTok().decode(exp)  # incremental detokenization == one-shot decode
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
        assert all(not o.finished for o in outs[:-1]) and outs[-1].completion_tokens == len(exp)
    assert stats.running == 0 and stats.pages_used == 0


def test_cancel_and_errors():
    async def main():
        eng = AsyncLLMEngine(make_engine(max_queue=2))
        await eng.start()
        gen = eng.generate("long", [70] * 12, SamplingParams(max_tokens=50, ignore_eos=True))
        first = await gen.__anext__()
        assert first.new_token_ids and not first.finished
        await gen.aclose()  # client goes away mid-stream
        for _ in range(200):
            await asyncio.sleep(0.01)
            st = eng.stats()
            if st.running == 0 and st.pages_used == 0:
                break
        assert st.running == 0 and st.pages_used == 0
        assert st.finished_by_reason.get("cancelled") == 1
        with pytest.raises(InvalidRequestError):
            await eng.generate("bad", [], SamplingParams()).__anext__()
        with pytest.raises(InvalidRequestError):
            await eng.generate("bad", [CFG.vocab_size + 5], SamplingParams()).__anext__()
        # queue-full: pretend a backlog of submitted requests the engine thread has not taken yet
        eng._pending_adds = 2
        with pytest.raises(QueueFullError):
            await eng.generate("x", [70], SamplingParams()).__anext__()
        eng._pending_adds = 0
        done = [o async for o in eng.generate("ok", [70] * 4, SamplingParams(max_tokens=3, ignore_eos=True))]
        assert done[-1].finished and sum(len(o.new_token_ids) for o in done) == 3
        await eng.shutdown(1.0)
        with pytest.raises(QueueFullError):
            await eng.generate("late", [70], SamplingParams()).__anext__()

    asyncio.run(main())
