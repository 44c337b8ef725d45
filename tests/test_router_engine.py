"""The real engine reports the slot forecast token-aware routing reads (`EngineStats.slot_free_tokens`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.serving.brain.router import FORECAST_PRIOR_TOKENS
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import SamplingParams


def test_engine_stats_forecast_slots_from_its_queue_and_finished_lengths() -> None:
    model = Llama(NAMED_CONFIGS["tiny"], dtype=jnp.float32, rngs=nnx.Rngs(0))
    eng = LLMEngine(model, config=EngineConfig(num_slots=2, page_size=8, num_pages=32, max_model_len=64,
                                               prefill_buckets=(16,), max_prefill_tokens_per_step=16,
                                               kernel_impl="reference"))
    assert eng.stats().slot_free_tokens == [0.0, 0.0]  # idle
    sp = SamplingParams(max_tokens=3, ignore_eos=True)  # max_tokens is not used as a length estimate
    for i in range(3):
        eng.add_request(f"r{i}", [5, 6, 7, 8], sp)
    prior = FORECAST_PRIOR_TOKENS  # nothing finished yet, no predictor: every request counts the prior
    # fcfs queue of 3 over 2 free slots: two take the slots until `prior`, the third follows one of them
    assert eng.stats().slot_free_tokens == [prior, 2 * prior]
    while eng.has_unfinished():
        eng.step()
    assert eng.stats().slot_free_tokens == [0.0, 0.0]
    for i in range(3):  # now the prior is the mean output length of the finished requests: 3 tokens
        eng.add_request(f"s{i}", [5, 6, 7, 8], sp)
    assert eng.stats().slot_free_tokens == [3.0, 6.0]
