"""Trace replay (teacher-forced decoding): the engine emits the given answer, and everything it
computes along the way (KV, the in-graph probe) is what one teacher-forced forward pass over
prompt + answer computes. Checked with multi-step decode and under preemption (recompute, swap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.probe import ProbeConfig, ProbeHead
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import FinishReason, InvalidRequestError, SamplingParams

CFG = NAMED_CONFIGS["tiny"].replace(tie_embeddings=False)


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(11))


@pytest.fixture(scope="module")
def probe() -> ProbeHead:
    return ProbeHead(ProbeConfig(d_model=CFG.d_model, layer=0, hidden=32), rngs=nnx.Rngs(5))


class Recorder:
    """Every probe output the engine reports, with the number of tokens generated at that point."""

    def __init__(self):
        self.prefill: dict[str, list[np.ndarray]] = {}
        self.decode: dict[str, list[tuple[int, np.ndarray]]] = {}

    def on_prefill(self, seq, probs):
        self.prefill.setdefault(seq.request_id, []).append(np.array(probs))

    def on_decode(self, seq, probs, n_new):
        self.decode.setdefault(seq.request_id, []).append((seq.num_generated, np.array(probs)))


def config(**kw) -> EngineConfig:
    # decode_steps_per_call=4: no other test uses it (test_engine counts compilations of its own 3)
    base = dict(num_slots=4, page_size=4, num_pages=96, max_model_len=96, prefill_buckets=(8, 16, 32),
                max_prefill_tokens_per_step=24, decode_steps_per_call=4, kernel_impl="reference")
    return EngineConfig(**{**base, **kw})


REF_WIDTH = 64  # above every prompt + answer of workload() (at most 29 + 24 tokens)


@pytest.fixture(scope="module")
def teacher_forced_taps(model: Llama):
    """The reference: layer-0 taps of one forward pass over prompt + answer, without a cache. Padding
    at the end cannot change earlier positions under causal attention, so one fixed width means one
    compilation (eagerly, each new length recompiled every op of the forward: ~5 s a sequence)."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, jnp.arange(REF_WIDTH)[None], tap_layer=0).tap[0])

    def taps(ids: list[int]) -> np.ndarray:
        assert len(ids) <= REF_WIDTH
        return np.asarray(fwd(state, jnp.asarray([ids + [0] * (REF_WIDTH - len(ids))], jnp.int32)))

    return taps


def workload(n: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(2, 30)).tolist() for _ in range(n)]
    answers = [rng.integers(0, CFG.vocab_size, rng.integers(1, 25)).tolist() for _ in range(n)]
    return prompts, answers


@pytest.mark.parametrize("mode,rate", [("recompute", 0.0), ("recompute", 0.2), ("swap", 0.2)])
def test_replay_emits_the_answer_and_probe_sees_it(model, probe, teacher_forced_taps, mode, rate):
    prompts, answers = workload(10, seed=2)
    rec = Recorder()
    engine = LLMEngine(model, config=config(preemption_mode=mode), probe=probe, predictor=rec)
    rng = np.random.default_rng(0)
    # a nominal max_tokens well above every answer (a server sees no length); eos ids inside the
    # answers (id 0..2 may occur) must not stop it: the given answer is what is emitted
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=64, temperature=1.0, seed=i,
                                                          forced_output_ids=tuple(a)))
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
    while engine.has_unfinished():
        engine.step()
        for s in list(engine.running):
            if rng.random() < rate:
                engine.preempt(s)
    if rate:
        assert engine.num_preemptions > 0
    assert engine.blocks.num_used == 0
    for s, p, a in zip(seqs, prompts, answers, strict=True):
        assert s.output_ids == a
        assert s.finish_reason is FinishReason.STOP
        # reference: one teacher-forced forward pass over prompt + answer
        tap = teacher_forced_taps(p + a)
        want_prefill = np.asarray(probe.probs(jnp.asarray(tap[:len(p)].mean(0))))
        for got in rec.prefill[s.request_id]:  # the first prefill and any recompute of it
            np.testing.assert_allclose(got, want_prefill, atol=1e-5)
        for n_gen, got in rec.decode.get(s.request_id, []):  # tap of the last token fed to that call
            np.testing.assert_allclose(got, np.asarray(probe.probs(jnp.asarray(tap[len(p) + n_gen - 2]))),
                                       atol=1e-5)


def test_replay_respects_max_tokens_and_validates(model):
    engine = LLMEngine(model, config=config())
    s = engine.add_request("cut", [5, 6, 7], SamplingParams(max_tokens=3, forced_output_ids=(9, 8, 7, 6, 5)))
    while engine.has_unfinished():
        engine.step()
    assert s.output_ids == [9, 8, 7] and s.finish_reason is FinishReason.LENGTH
    with pytest.raises(InvalidRequestError, match="forced_output_ids"):
        engine.add_request("bad", [5, 6], SamplingParams(forced_output_ids=(CFG.vocab_size,)))
    with pytest.raises(InvalidRequestError, match="forced_output_ids"):
        SamplingParams(forced_output_ids=(-1,))
