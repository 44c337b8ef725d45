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


def test_probe_hold_lets_probes_wait_for_a_step_that_prefills():
    """trail's `probe_hold_s`: a waiting request's probe-only prefill waits for a step that already
    prefills an admitted prompt (one device call either way) unless it has waited that long; with 0
    it runs in the next step, in a prefill call of its own."""
    import time

    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(7))
    probe = ProbeHead(ProbeConfig(d_model=CFG.d_model, layer=0, hidden=32), rngs=nnx.Rngs(3))
    edges = np.linspace(0, 20, probe.cfg.num_bins + 1)

    def engine_with(hold: float) -> LLMEngine:
        cfg = EngineConfig(num_slots=2, page_size=4, num_pages=160, max_model_len=64,
                           prefill_buckets=(8, 16, 32), max_prefill_tokens_per_step=256,
                           kernel_impl="reference", async_scheduling=False,
                           policy=make_policy("trail", probe_hold_s=hold))
        pred = TrailPredictor(edges, (edges[1:] + edges[:-1]) / 2)
        return LLMEngine(model, config=cfg, probe=probe, predictor=pred)

    def add(engine: LLMEngine, name: str, n: int) -> None:
        engine.add_request(name, list(range(3, 3 + 6)), SamplingParams(max_tokens=n, ignore_eos=True))

    now = engine_with(0.0)
    held = engine_with(60.0)
    for e in (now, held):
        add(e, "a", 4)
        add(e, "b", 12)
        e.step()  # a and b admitted: the slots are full
        add(e, "c", 4)
        add(e, "d", 4)
        e.step()  # c and d must wait
    assert now.probe_calls == 2 and now.last_step.prefill_chunks == 2  # probed at once, a call of their own
    assert held.probe_calls == 0 and held.last_step.prefill_chunks == 0  # held: a decode-only step
    while held.probe_calls == 0:
        held.step()
        assert held.last_step.prefill_chunks == 0 or held.probe_calls == 1
    # a finished, c was admitted; d's probe rode in c's prefill call
    assert held.last_step.prefill_chunks == 2 and held.probe_calls == 1
    assert [s.request_id for s in held.running] == ["b", "c"]

    timed = engine_with(0.2)
    add(timed, "a", 30)
    add(timed, "b", 30)
    timed.step()
    add(timed, "c", 4)
    timed.step()
    assert timed.probe_calls == 0
    time.sleep(0.25)
    timed.step()  # waited past the hold: probed without an admission
    assert timed.probe_calls == 1 and timed.last_step.prefill_chunks == 1
    for e in (now, held, timed):
        while e.has_unfinished():
            e.step()
        e.blocks.check_invariants()
        assert e.blocks.num_used == 0
