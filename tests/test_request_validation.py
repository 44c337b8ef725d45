"""Issue 14, item 1: every SamplingParams field is range- and type-checked before a request reaches
the engine thread; the engine's uint32 seed cast never raises; a failed offline call leaves the
engine clean (the next call on the same LLM works)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from jtrail.serving.sequence import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    InvalidRequestError,
    SamplingParams,
)

from jtrail import LLM

BAD = [
    ("seed", -1), ("seed", 2**32), ("seed", 2**63 - 1), ("seed", 1.5), ("seed", True), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", 2**31), ("max_tokens", 3.0), ("max_tokens", None),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1e-9), ("temperature", 1e39),
    ("temperature", "hot"), ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.0000001), ("top_p", -math.inf),
    ("top_k", -1), ("top_k", 2**31), ("top_k", 2.0), ("ignore_eos", "yes"),
    ("stop", [""]), ("stop", [7]), ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
    ("stop", ["x" * (MAX_STOP_STRING_CHARS + 1)]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [2**31]), ("stop_token_ids", ["2"]),
    ("stop_token_ids", list(range(MAX_STOP_TOKEN_IDS + 1))), ("stop_token_ids", 3),
]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_field_is_rejected_naming_it(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field


def test_good_edges_and_numpy_are_normalized() -> None:
    p = SamplingParams(seed=np.uint32(2**32 - 1), max_tokens=np.int64(5), temperature=np.float32(0.5),
                       top_p=1, top_k=np.int32(0), stop="END", stop_token_ids=[np.int64(2)],
                       ignore_eos=np.bool_(True))
    assert (p.seed, p.max_tokens, p.temperature, p.top_p, p.stop, p.stop_token_ids, p.ignore_eos) == (
        2**32 - 1, 5, 0.5, 1.0, ("END",), (2,), True)
    assert all(type(v) in (int, float, bool) for v in (p.seed, p.max_tokens, p.temperature, p.top_p,
                                                       p.top_k, p.ignore_eos))
    assert SamplingParams(seed=0).seed == 0


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", progress=False)


def test_offline_llm_survives_bad_seed_and_engine_errors(llm: LLM, monkeypatch) -> None:
    good = SamplingParams(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    want = llm.generate("hello", good)[0].token_ids
    with pytest.raises(InvalidRequestError, match="seed"):
        llm.generate("hello", SamplingParams(seed=-1, temperature=1))
    # a seed that bypassed validation (object.__setattr__) is cast modulo 2**32, not an OverflowError
    bypass = SamplingParams(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    object.__setattr__(bypass, "seed", 3 + 2**32)
    assert llm.generate("hello", bypass)[0].token_ids == want
    # an engine error mid-call fails that call only: its requests leave the engine
    engine = llm.backend.engine
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate(["a", "b"], good)
    monkeypatch.setattr(engine, "step", real_step)
    assert not engine.has_unfinished() and engine.blocks.num_used == 0 and not engine.requests
    # a bad request in the middle of a batch leaves none of the batch behind
    with pytest.raises(InvalidRequestError):
        engine.generate_batch([[5, 6], [llm.cfg.vocab_size]], good, progress=False)
    assert not engine.has_unfinished() and not engine.requests
    assert llm.generate("hello", good)[0].token_ids == want


def test_priority_checked_in_engine(llm: LLM) -> None:
    engine = llm.backend.engine
    for bad in (2**31, 1.5, "1"):
        with pytest.raises(InvalidRequestError, match="priority"):
            engine.add_request("p", [5, 6], SamplingParams(), priority=bad)
    assert not engine.requests
