"""StopRule: a request's stop rules resolved once, checked per token (serving/engine/stop_rule.py),
against hand-worked cases; and through the engine, a context-limited request ends with LENGTH at the
limit with every token delivered."""

from __future__ import annotations

import numpy as np
import pytest
from jtrail.serving.engine.fake_runner import EOS_ID, FakeRunner
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.engine.stop_rule import StopRule
from jtrail.serving.sequence import FinishReason, SamplingParams

STOP, LENGTH = FinishReason.STOP, FinishReason.LENGTH
EOS = (2,)


@pytest.mark.parametrize("params,prompt,max_len,token,generated,text,want", [
    (SamplingParams(max_tokens=10), 5, 100, 7, 3, "", (None, False)),
    (SamplingParams(max_tokens=10), 5, 100, 2, 3, "", (STOP, False)),  # eos
    (SamplingParams(max_tokens=10, ignore_eos=True), 5, 100, 2, 3, "", (None, False)),
    (SamplingParams(max_tokens=10, ignore_eos=True), 5, 100, 2, 10, "", (LENGTH, False)),
    (SamplingParams(max_tokens=10, stop_token_ids=[9]), 5, 100, 9, 3, "", (STOP, False)),
    (SamplingParams(max_tokens=10), 5, 100, 7, 10, "", (LENGTH, False)),  # max_tokens
    (SamplingParams(max_tokens=10), 95, 100, 7, 5, "", (LENGTH, False)),  # the context: 95 + 5 = 100
    (SamplingParams(max_tokens=10), 95, 100, 7, 4, "", (None, False)),
    (SamplingParams(max_tokens=10, stop=["ab"]), 5, 100, 7, 3, "xxab", (STOP, True)),
    (SamplingParams(max_tokens=10, stop=["ab"]), 5, 100, 7, 3, "xxa", (None, False)),
    # a replayed answer ends after its last token; eos and stop ids inside it do not stop it
    (SamplingParams(max_tokens=10, forced_output_ids=[4, 2, 9]), 5, 100, 2, 2, "", (None, False)),
    (SamplingParams(max_tokens=10, forced_output_ids=[4, 2, 9], stop_token_ids=[9]), 5, 100, 9, 3, "",
     (STOP, False)),
    (SamplingParams(max_tokens=2, forced_output_ids=[4, 2, 9]), 5, 100, 2, 2, "", (LENGTH, False)),
])
def test_stop_rule_cases(params, prompt, max_len, token, generated, text, want):
    assert StopRule.of(params, prompt, EOS, max_len).check(token, generated, text) == want


def test_context_limit_ends_with_length_through_the_engine():
    max_len, prompt = 64, 50
    cfg = EngineConfig(num_slots=2, page_size=16, num_pages=16, max_model_len=max_len, max_queue=4,
                       async_scheduling=True, steps_in_flight=2)
    engine = LLMEngine(None, None, cfg, runner=FakeRunner(2, max_len, 16))
    ids = np.random.default_rng(0).integers(3, 200, prompt).tolist()
    assert EOS_ID not in ids
    engine.add_request("a", ids, SamplingParams(max_tokens=40, ignore_eos=True))
    got, reason = [], None
    for _ in range(100):
        for o in engine.step():
            got += o.new_token_ids
            reason = o.finish_reason if o.finished else reason
        if not engine.has_unfinished():
            break
    assert reason is LENGTH and len(got) == max_len - prompt
    engine.blocks.check_invariants()
    assert engine.blocks.num_used == 0
