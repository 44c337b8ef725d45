"""One forward per step: a step that admits N requests (and probes the ones that must wait) makes
one packed prefill call, and no step makes more than two device calls (prefill + decode)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.probe import ProbeConfig, ProbeHead
from jtrail.serving.brain.predictor import TrailPredictor
from jtrail.serving.brain.scheduler.registry import make_policy
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import SamplingParams

CFG = NAMED_CONFIGS["tiny"].replace(tie_embeddings=False)


def test_calls_per_step_and_prefill_in_one_call():
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(7))
    probe = ProbeHead(ProbeConfig(d_model=CFG.d_model, layer=0, hidden=32), rngs=nnx.Rngs(3))
    edges = np.linspace(0, 20, probe.cfg.num_bins + 1)
    cfg = EngineConfig(num_slots=4, page_size=4, num_pages=160, max_model_len=64,
                       prefill_buckets=(8, 16, 32),
                       max_prefill_tokens_per_step=256, decode_steps_per_call=2, kernel_impl="reference",
                       policy=make_policy("trail"))
    pred = TrailPredictor(edges, (edges[1:] + edges[:-1]) / 2)
    engine = LLMEngine(model, config=cfg, probe=probe, predictor=pred)
    # compiled code is shared by runners of equal statics (other tests in this process): count ours
    traced_before = engine.runner.trace_counts["prefill"]
    rng = np.random.default_rng(0)
    for i in range(7):  # 4 admitted (prompts up to 30 tokens: several rows each) + 3 probed
        engine.add_request(f"r{i}", rng.integers(3, CFG.vocab_size, rng.integers(5, 30)).tolist(),
                           SamplingParams(max_tokens=int(rng.integers(2, 9)), ignore_eos=True))
    per_step = []
    while engine.has_unfinished():
        before = engine.runner.calls
        engine.step()
        per_step.append(engine.runner.calls - before)
    assert per_step[0] == 1 and engine.probe_calls == 3  # 4 prefills + 3 probe-only prefills: one call
    assert max(per_step) <= 2
    assert engine.runner.trace_counts["prefill"] - traced_before <= len(cfg.prefill_buckets)
