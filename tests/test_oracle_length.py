"""A request's true output length is a request field (`add_request(oracle_length=)`), set before the
policy files the request: srpt-oracle ranks by it with no patched hooks."""

from __future__ import annotations

import pytest
from jtrail.serving.brain.scheduler.registry import make_policy
from jtrail.serving.engine.fake_runner import ByteTokenizer, FakeRunner
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import InvalidRequestError, SamplingParams


def _engine(policy: str) -> LLMEngine:
    cfg = EngineConfig(num_slots=1, num_pages=64, page_size=4, max_model_len=64, policy=make_policy(policy),
                       prefill_buckets=(8,), max_prefill_tokens_per_step=8)
    return LLMEngine(None, ByteTokenizer(), cfg, runner=FakeRunner(1, 64, 4))


def test_srpt_oracle_admits_by_the_given_lengths():
    eng = _engine("srpt-oracle")
    lengths = {"a": 9, "b": 2, "c": 5, "d": 1}
    for rid, n in lengths.items():
        eng.add_request(rid, [65, 66], SamplingParams(max_tokens=n, ignore_eos=True), oracle_length=n)
    first_token: list[str] = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id not in first_token:
                first_token.append(o.request_id)
    # all four wait for the one slot before the first step: shortest true length first (fcfs: a b c d)
    assert first_token == ["d", "b", "c", "a"]


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3"])
def test_bad_oracle_length_names_the_field(bad):
    with pytest.raises(InvalidRequestError, match="oracle_length"):
        _engine("fcfs").add_request("r", [65], SamplingParams(max_tokens=2), oracle_length=bad)
