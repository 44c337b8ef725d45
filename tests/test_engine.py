"""LLMEngine: continuous batching equals per-request dense recomputation (greedy, f32, CPU), with and
without preemption in both modes; bounded compilations; cancel; in-graph probe tap; sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jtrail.models.attention import DenseMeta
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.probe import ProbeConfig, ProbeHead
from jtrail.serving.engine import swap
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import FinishReason, InvalidRequestError, QueueFullError, SamplingParams, Status

# untied head: with tied embeddings the random tiny model just repeats its last token
CFG = NAMED_CONFIGS["tiny"].replace(tie_embeddings=False)
MAX_LEN = 64


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(7))


def dense_greedy(model: Llama, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Independent reference: no cache, the whole sequence recomputed each token, rows right-padded
    (dense attention masks padding, so rows cannot see each other)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, toks, lengths):
        m = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(toks.shape[1])[None], toks.shape)
        return m(toks, pos, meta=DenseMeta(lengths), logits_index=lengths - 1).logits

    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max(max_tokens)):
        toks = np.zeros((len(seqs), MAX_LEN), np.int32)
        for i, s in enumerate(seqs):
            toks[i, :len(s)] = s
        lengths = np.array([len(s) for s in seqs], np.int32)
        nxt = np.asarray(jnp.argmax(last_logits(state, toks, lengths), -1))
        for i in range(len(seqs)):
            if len(outs[i]) < max_tokens[i]:
                outs[i].append(int(nxt[i]))
                seqs[i].append(int(nxt[i]))
    return outs


def workload(n: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(1, 40)).tolist() for _ in range(n)]
    max_tokens = [int(rng.integers(1, 14)) for _ in range(n)]
    return prompts, max_tokens


def small_config(**kw) -> EngineConfig:
    base = dict(num_slots=8, page_size=4, num_pages=160, max_model_len=MAX_LEN, prefill_buckets=(8, 16, 32),
                max_prefill_tokens_per_step=40, decode_steps_per_call=2, kernel_impl="reference")
    base.update(kw)
    return EngineConfig(**base)


def run_engine(engine: LLMEngine, prompts, max_tokens, preempt_rate: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        engine.blocks.check_invariants()
        for s in list(engine.running):
            if rng.random() < preempt_rate:
                engine.preempt(s)
        steps += 1
        assert steps < 5000
    assert engine.blocks.num_free == engine.blocks.num_usable  # nothing leaked
    assert sorted(engine.free_slots) == list(range(engine.config.num_slots))
    return seqs


@pytest.fixture(scope="module")
def reference(model):
    prompts, max_tokens = workload(64, seed=1)
    return prompts, max_tokens, dense_greedy(model, prompts, max_tokens)


@pytest.mark.parametrize("mode,rate,pages", [("recompute", 0.0, 160), ("recompute", 0.15, 48),
                                             ("swap", 0.15, 48), ("swap", 0.0, 48), ("keep", 0.15, 160),
                                             ("keep", 0.15, 48)])
def test_batched_equals_alone(model, reference, mode, rate, pages):
    prompts, max_tokens, expected = reference
    engine = LLMEngine(model, config=small_config(preemption_mode=mode, num_pages=pages))
    seqs = run_engine(engine, prompts, max_tokens, preempt_rate=rate, seed=3)
    if rate > 0 or pages < 100:  # the scenario must really preempt (forced, or out of pages)
        assert engine.num_preemptions > 0
    for s, exp in zip(seqs, expected, strict=True):
        assert s.output_ids == exp, s.request_id
        assert s.finish_reason is FinishReason.LENGTH
        assert len(s.token_times) == len(exp) and s.first_token_time <= s.finish_time
    engine.blocks.check_invariants()
    assert engine.blocks.num_used == 0  # every page back, kept ones included


def test_keep_preemption_keeps_the_pages_and_resumes_without_prefill(model, reference):
    """preemption_mode "keep": a preempted request frees its slot only; its KV stays in its own pages and
    it resumes as a decode row (no prefill chunk, no new pages but the next one); tokens stay the dense
    reference's."""
    prompts, max_tokens, expected = reference
    engine = LLMEngine(model, config=small_config(preemption_mode="keep", num_slots=2, num_pages=17,
                                                  async_scheduling=False))
    seqs = [engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i], ignore_eos=True))
            for i in range(3)]
    while not (seqs[0].num_generated >= 2 and seqs[0].status is Status.RUNNING):
        engine.step()
    victim = seqs[0]
    pages, computed = list(victim.block_table), victim.num_computed_tokens
    engine.preempt(victim)
    assert victim.status is Status.SWAPPED and victim.slot is None and victim.block_table == pages
    assert all(engine.blocks.owner_of(p) == victim.request_id for p in pages)
    resumed = False
    while engine.has_unfinished():
        if victim.status is Status.SWAPPED and not victim.block_table:
            raise AssertionError("a kept request lost its pages without a recompute")
        was_kept = victim.status is Status.SWAPPED
        engine.step()
        batch_rows = engine.last_step
        if was_kept and victim.status is Status.RUNNING:  # resumed this step: a decode row, no prefill
            resumed = True
            assert batch_rows.prefill_chunks == 0 and victim.num_computed_tokens > computed
            assert victim.block_table[:len(pages)] == pages
        engine.blocks.check_invariants()
    assert resumed
    for s, exp in zip(seqs, expected[:3], strict=True):
        assert s.output_ids == exp, s.request_id
    assert engine.blocks.num_used == 0


def kept_pair(model, num_pages: int, max_tokens: tuple[int, int], **kw):
    """Two slots under "keep": a 12-token prompt and a 3-token one; the first, once it has two tokens, is
    preempted (its KV kept). -> (engine, first, second)."""
    cfg = small_config(preemption_mode="keep", num_slots=2, num_pages=num_pages, **kw)
    engine = LLMEngine(model, config=cfg)
    first, second = (engine.add_request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True))
                     for rid, prompt, n in (("first", list(range(3, 15)), max_tokens[0]),
                                            ("second", [5, 6, 7], max_tokens[1])))
    while first.num_generated < 2:
        engine.step()
    engine.preempt(first)
    return engine, first, second


def test_kept_pages_go_first_when_an_admission_needs_them(model):
    """Under "keep", a request that needs pages only kept requests hold gets them: the kept request with
    the longest estimated remaining loses its KV (waiting, to recompute) and no running one is touched."""
    engine, long_, short = kept_pair(model, num_pages=9, max_tokens=(20, 4), async_scheduling=False)
    held = len(long_.block_table)
    assert long_.status is Status.SWAPPED and held >= 4 and engine.blocks.num_free < 4
    big = engine.add_request("big", list(range(20, 36)), SamplingParams(max_tokens=2, ignore_eos=True))
    assert engine.scheduler._admit(big, 0.0)  # the admission a policy ranking "big" first makes
    engine.blocks.check_invariants()
    assert big.status is Status.RUNNING and short.status is Status.RUNNING
    assert long_.status is Status.WAITING and long_.block_table == [] and long_.num_computed_tokens == 0
    assert engine.num_preemptions == 1  # the kept request's KV went; no running request was preempted
    while engine.has_unfinished():
        engine.step()
    assert long_.num_generated == 20 and short.num_generated == 4 and engine.blocks.num_used == 0


def test_cancelling_a_kept_request_frees_its_pages(model):
    """A request preempted under "keep" holds pages while it waits; cancelling it returns them at once
    and the others finish as before."""
    engine, a, b = kept_pair(model, num_pages=40, max_tokens=(12, 6))
    held = list(a.block_table)
    assert held and all(engine.blocks.owner_of(p) == a.request_id for p in held)
    free_before = engine.blocks.num_free
    out = engine.abort(a.request_id)
    assert out is not None and out.finished
    # its pages come back (a step in flight may still be writing them: reused only by later calls)
    assert engine.blocks.num_free == free_before + len(held) and a not in engine.scheduler.waiting
    assert all(engine.blocks.owner_of(p) is None for p in held)
    while engine.has_unfinished():
        engine.step()
    engine.blocks.check_invariants()
    assert b.num_generated == 6 and engine.blocks.num_used == 0


@pytest.mark.parametrize("rope_in_kernel,decode_steps", [(False, 1), (True, 1), (True, 3)])
def test_pallas_kernels_in_the_engine_equal_alone(model, reference, rope_in_kernel, decode_steps):
    """The GPU kernels (interpret mode) in the engine's steps: decode reads q, k and v in place from the
    fused projection (write_kv_from_qkv, decode_attention_from_qkv), prefill from its slices. With
    rope_in_kernel a decode step's layer rotates, writes and attends in one kernel (decode_rope_write),
    inside the multi-token decode loop too (3 tokens per call), and mixed steps keep the model's RoPE."""
    prompts, max_tokens, expected = reference
    cfg = small_config(kernel_impl="pallas_interpret", decode_steps_per_call=decode_steps,
                       rope_in_kernel=rope_in_kernel)
    engine = LLMEngine(model, config=cfg)
    assert engine.runner.statics.rope_in_kernel is rope_in_kernel
    seqs = run_engine(engine, prompts[:6], max_tokens[:6])
    for s, exp in zip(seqs, expected[:6], strict=True):
        assert s.output_ids == exp, s.request_id


def test_rope_in_kernel_without_the_gpu_kernels_fails_before_any_step(model):
    with pytest.raises(ValueError, match="rope_in_kernel"):
        LLMEngine(model, config=small_config(kernel_impl="reference", rope_in_kernel=True))


def test_compilations_bounded(model):
    # decode_steps_per_call=3 is used by no other test: its compile counters start at 0 here
    cfg = small_config(preemption_mode="swap", num_pages=60, num_slots=6, decode_steps_per_call=3)
    swaps_before = sum(swap.TRACE_COUNTS.values())
    engine = LLMEngine(model, config=cfg)
    prompts, max_tokens = workload(200, seed=5)
    run_engine(engine, prompts, max_tokens, preempt_rate=0.05, seed=9)
    assert engine.num_preemptions > 0
    # one decode graph + one per prefill bucket; swap: one gather + one scatter per page-count bucket
    assert engine.runner.trace_counts["decode"] == engine.runner.decode_graphs  # (GPU default: 2 copies)
    assert engine.runner.trace_counts["prefill"] <= len(cfg.prefill_buckets)
    # swap: gather + scatter per page-count bucket 1, 2, 4, 8, 16 (<= 64 tokens / 4 per page)
    assert sum(swap.TRACE_COUNTS.values()) - swaps_before <= 2 * 5


def test_cancel_frees_slot_and_pages(model):
    engine = LLMEngine(model, config=small_config())
    engine.add_request("a", list(range(3, 30)), SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("b", list(range(3, 10)), SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()
    engine.step()
    a = engine.requests["a"]
    assert a.status is Status.RUNNING and a.block_table
    used = engine.blocks.num_used
    n_a = len(a.block_table)
    out = engine.abort(a.request_id)
    assert out.finished and out.finish_reason is FinishReason.CANCELLED
    assert engine.blocks.num_used == used - n_a and a.block_table == [] and a.slot is None
    assert len(engine.free_slots) == engine.config.num_slots - 1
    assert engine.abort("a") is None
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used == 0


def test_bad_requests(model):
    engine = LLMEngine(model, config=small_config(max_queue=2))
    with pytest.raises(InvalidRequestError):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.add_request("x", [CFG.vocab_size], SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.add_request("x", [5] * MAX_LEN, SamplingParams())
    engine.add_request("x", [5], SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.add_request("x", [5], SamplingParams())
    engine.add_request("y", [5], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("z", [5], SamplingParams())
    with pytest.raises(ValueError):
        EngineConfig(preemption_mode="drop")


def test_stop_token_and_eos(model, reference):
    prompts, _, expected = reference
    # choose a stop id that appears mid-output in the greedy reference of a request
    i, j = next((i, j) for i, e in enumerate(expected) for j in range(1, len(e)) if e[j] not in e[:j])
    engine = LLMEngine(model, config=small_config())
    s = engine.add_request("s", prompts[i], SamplingParams(max_tokens=30, ignore_eos=True,
                                                           stop_token_ids=(expected[i][j],)))
    while engine.has_unfinished():
        engine.step()
    assert s.output_ids == expected[i][:j + 1] and s.finish_reason is FinishReason.STOP


class Recorder:
    def __init__(self):
        self.prefill, self.decode = {}, {}

    def on_prefill(self, seq, probs):
        self.prefill[seq.request_id] = np.array(probs)

    def on_decode(self, seq, probs, n_new):
        self.decode.setdefault(seq.request_id, []).append((seq.num_generated, n_new, np.array(probs)))


def test_probe_tap_matches_dense(model):
    probe = ProbeHead(ProbeConfig(d_model=CFG.d_model, layer=0, hidden=32), rngs=nnx.Rngs(3))
    rec = Recorder()
    cfg = small_config(max_prefill_tokens_per_step=8, prefill_buckets=(8,))
    engine = LLMEngine(model, config=cfg, probe=probe, predictor=rec)
    prompt = list(range(10, 31))  # 21 tokens: prefill runs in 3 chunks under the budget of 8
    seq = engine.add_request("p", prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    full = seq.all_ids
    toks = jnp.asarray(full, jnp.int32)[None]
    tap = model(toks, jnp.arange(len(full))[None], tap_layer=0).tap[0]
    want_prefill = np.asarray(probe.probs(tap[:len(prompt)].mean(0)))
    np.testing.assert_allclose(rec.prefill["p"], want_prefill, atol=1e-5)
    # each decode call reports the tap of its last fed token: the one at position num_tokens - 2
    for n_gen, n_new, probs in rec.decode["p"]:
        assert n_new >= 1
        np.testing.assert_allclose(probs, np.asarray(probe.probs(tap[len(prompt) + n_gen - 2])), atol=1e-5)


def test_sampling_independent_of_batch(model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = LLMEngine(model, config=small_config())
    a = alone.add_request("a", [5, 6, 7], params)
    while alone.has_unfinished():
        alone.step()
    busy = LLMEngine(model, config=small_config())
    prompts, max_tokens = workload(10, seed=2)
    for i, p in enumerate(prompts):
        busy.add_request(f"n{i}", p, SamplingParams(max_tokens=max_tokens[i], temperature=0.7, seed=i))
    b = busy.add_request("a", [5, 6, 7], params)
    while busy.has_unfinished():
        busy.step()
    assert a.output_ids == b.output_ids
    c_params = SamplingParams(max_tokens=8, temperature=1.0, seed=99, ignore_eos=True)
    assert alone.generate_batch([[5, 6, 7]], c_params, progress=False)[0].output_ids != a.output_ids


@pytest.mark.parametrize("async_on,depth", [(False, None), (True, 1), (True, 2)])
def test_trail_probes_waiting_requests_before_admission(model, async_on, depth):
    """A request that must wait for a slot gets its length prediction from a probe-only prefill of
    its prompt (the same probe output as its real prefill later), so a length-aware policy can rank
    it without preempting anyone to learn it; the borrowed pages come back, outputs are unchanged.
    Async scheduling processes a step's outputs `steps_in_flight` steps later: the predictions are
    read then (depth 2: the GPU's default)."""
    from jtrail.serving.brain.predictor import TrailPredictor
    from jtrail.serving.brain.scheduler.registry import make_policy

    probe = ProbeHead(ProbeConfig(d_model=CFG.d_model, layer=0, hidden=32), rngs=nnx.Rngs(3))
    edges = np.linspace(0, 20, probe.cfg.num_bins + 1)
    rec = Recorder()

    class Both(TrailPredictor):  # TRAIL refinement, and a record of every prefill probe output
        def on_prefill(self, seq, probs):
            rec.prefill.setdefault(seq.request_id, []).append(np.array(probs))
            super().on_prefill(seq, probs)

    cfg = small_config(num_slots=2, policy=make_policy("trail"), prefill_buckets=(8, 16, 32, 64),
                       max_prefill_tokens_per_step=256, async_scheduling=async_on, steps_in_flight=depth)
    engine = LLMEngine(model, config=cfg, probe=probe, predictor=Both(edges, (edges[1:] + edges[:-1]) / 2))
    prompts, max_tokens = workload(6, seed=4)
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
    engine.step()
    for _ in range(engine.steps_in_flight):  # async: the probe outputs are read steps_in_flight later
        assert all(s.predicted_remaining is None for s in seqs[2:])  # dispatched, not yet processed
        engine.step()
    # 2 slots: the 2 oldest admitted (prefilled), the other 4 probed while they wait
    assert [s.status is Status.WAITING for s in seqs] == [False, False, True, True, True, True]
    assert all(s.predicted_remaining is not None for s in seqs)
    assert engine.probe_calls == 4 and engine.probe_tokens == sum(len(s.prompt_ids) for s in seqs[2:])
    assert engine.blocks.num_used == sum(len(s.block_table) for s in seqs[:2])  # borrowed pages returned
    while engine.has_unfinished():
        engine.step()
    engine.blocks.check_invariants()
    assert engine.blocks.num_used == 0
    for s in seqs[2:]:  # probed while waiting, then prefilled on admission: the same prompt-mean tap
        first, *rest = rec.prefill[s.request_id]
        for again in rest:
            np.testing.assert_allclose(again, first, atol=1e-5)
    want = dense_greedy(model, prompts, max_tokens)
    assert [s.output_ids for s in seqs] == want
