"""Host time of a jitted step: the runner's static key hashes once and is shared by equal runners, so
jit neither re-hashes the model's graphdef nor deep-compares two equal ones on every call; the
weights travel as flat leaves, and the runner's `state` still reads as the model's nnx.State."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import SamplingParams

CFG = NAMED_CONFIGS["tiny"]


def _engine(model):
    cfg = EngineConfig(num_slots=2, page_size=4, num_pages=32, max_model_len=32, prefill_buckets=(8,),
                       max_prefill_tokens_per_step=16, kernel_impl="reference")
    return LLMEngine(model, config=cfg)


def test_statics_hash_once_and_interned():
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    a, b = _engine(model).runner, _engine(Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(1))).runner
    assert a.statics is b.statics  # equal statics (same shapes, other weights): one key object
    h = hash(a.statics)
    assert a.statics.__dict__["_hash"] == h == hash(a.statics)
    # the flat leaves rebuild the model's state
    np.testing.assert_array_equal(np.asarray(a.state["layers"][0]["qkv_proj"][...]),
                                  np.asarray(model.layers[0].qkv_proj[...]))


def test_decode_does_not_retrace():
    engine = _engine(Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    before = engine.runner.trace_counts["decode"]
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.trace_counts["decode"] - before <= 1  # one compile at most, five calls
