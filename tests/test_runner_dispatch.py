"""Host time of a jitted step: the runner's static key hashes once and is shared by equal runners, so
jit neither re-hashes the model's graphdef nor deep-compares two equal ones on every call; the
weights travel as flat leaves, and the runner's `state` still reads as the model's nnx.State."""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
    # one compile at most per decode executable (1; the GPU default's 2), five calls
    assert engine.runner.trace_counts["decode"] - before <= engine.runner.decode_graphs


def _addresses(tree) -> list[int]:
    return [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(tree)]


def _run(engine, count: bool = False) -> tuple[dict[str, list[int]], int]:
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=7, ignore_eos=True))
    engine.add_request("b", [8, 9], SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.8, seed=3))
    runner, decodes, tokens = engine.runner, 0, {"a": [], "b": []}
    real_decode = runner._decode_call

    def counting(*args):
        nonlocal decodes
        decodes += 1
        return real_decode(*args)

    runner._decode_call = counting
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens, decodes


def test_decode_inputs_and_outputs_keep_their_device_buffers():
    """The decode call's inputs and outputs live in donated buffers that never move, so XLA's CUDA
    graph of the step is not updated (and uploaded again) on every call; the tokens the host reads are
    copies, still right after the next call has reused the buffers (async scheduling: the same tokens
    as the synchronous engine)."""
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    engine = _engine(model)
    assert engine.config.async_scheduling  # the default: a step is dispatched before the last is read
    io, caches = _addresses(engine.runner._ios), _addresses(engine.runner.caches)
    tokens, decodes = _run(engine)
    assert decodes >= 4
    assert _addresses(engine.runner._ios) == io and _addresses(engine.runner.caches) == caches
    sync = LLMEngine(model, config=dataclasses.replace(engine.config, async_scheduling=False))
    assert tokens == _run(sync)[0] and [len(tokens[r]) for r in "ab"] == [7, 5]


@pytest.mark.parametrize("graphs", [2, 3])
def test_decode_graphs_rotate_and_give_the_same_tokens(graphs):
    """decode_graphs=2 or 3: consecutive decode calls rotate over that many executables, each with its
    own donated buffers that stay put; tokens equal the one-executable engine's."""
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    one = _engine(model)
    twin = LLMEngine(model, config=dataclasses.replace(one.config, decode_graphs=graphs))
    ios = [_addresses(io) for io in twin.runner._ios]
    assert len(ios) == graphs and len({tuple(a) for a in ios}) == graphs
    turns = []
    real_decode = twin.runner._decode_call

    def recording(*args):
        turns.append(twin.runner._turn)
        return real_decode(*args)

    twin.runner._decode_call = recording
    tokens, decodes = _run(twin)
    assert tokens == _run(one)[0] and decodes >= 4
    assert turns[:4] == [i % graphs for i in range(4)]
    assert [_addresses(io) for io in twin.runner._ios] == ios


def _buffers(runner) -> dict:
    return {rows: [_addresses(io) for io in ios] for rows, ios in [*runner._prefill_ios.items(),
                                                                   *runner._mixed_ios.items()]}


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("graphs", [1, 2])
def test_prefill_buffers_stay_put_and_rotate_per_capacity(graphs, mixed):
    """The packed prefill call (alone, or mixed with the decode rows) stages its inputs into and writes
    its outputs to donated buffers that never move (its CUDA graph is not updated per call), one set
    per capacity and compiled copy, the copies taken in turn per capacity; tokens equal the synchronous
    engine's."""
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    engine = LLMEngine(model, config=dataclasses.replace(_engine(model).config, prefill_graphs=graphs,
                                                         prefill_buckets=(8, 16), mixed_steps=mixed))
    runner = engine.runner
    assert runner.prefill_graphs == graphs and sorted(runner._prefill_ios) == [1, 2]  # 8 and 16 tokens
    assert runner.mixed_steps == mixed and len(runner._mixed_ios) == (2 if mixed else 0)
    before = _buffers(runner)
    turns: list[tuple[int, int]] = []
    name = "_mixed_call" if mixed else "_prefill_call"
    real = getattr(runner, name)

    def recording(pre, *args):
        rows = (pre[0] if mixed else pre).shape[0]
        turns.append((rows, runner._prefill_turn[rows]))
        return real(pre, *args)

    setattr(runner, name, recording)
    tokens: dict[str, list[int]] = {}
    prompts = {"a": [5, 6, 7], "b": list(range(3, 14)), "c": [8, 9], "d": list(range(20, 31))}
    for rid, ids in prompts.items():  # one at a time: four prefill calls, two per capacity
        engine.add_request(rid, ids, SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert turns == [(1, 0), (2, 0), (1, 1 % graphs), (2, 1 % graphs)]
    assert _buffers(runner) == before
    sync = LLMEngine(model, config=dataclasses.replace(engine.config, async_scheduling=False))
    want = {}
    for rid, ids in prompts.items():
        sync.add_request(rid, ids, SamplingParams(max_tokens=4, ignore_eos=True))
        while sync.has_unfinished():
            for out in sync.step():
                want.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens == want and all(len(t) == 4 for t in tokens.values())


def test_decode_graphs_or_steps_in_flight_out_of_range_are_refused_before_any_model_work():
    for bad in (0, 4):
        with pytest.raises(ValueError, match="decode_graphs"):
            EngineConfig(decode_graphs=bad)
        with pytest.raises(ValueError, match="prefill_graphs"):
            EngineConfig(prefill_graphs=bad)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="steps_in_flight"):
            EngineConfig(steps_in_flight=bad)


def test_decode_graphs_automatic_is_two_only_for_async_on_a_gpu(monkeypatch):
    """None: two executables where a CUDA graph would be updated on every call (async scheduling on
    a GPU); one elsewhere (this CPU; synchronous steps reuse the same temporaries)."""
    assert EngineConfig().resolved_decode_graphs() == 1  # the CPU backend
    assert EngineConfig().resolved_steps_in_flight() == 1
    assert EngineConfig(async_scheduling=False, steps_in_flight=2).resolved_steps_in_flight() == 0
    assert not EngineConfig().resolved_launch_thread()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert EngineConfig().resolved_decode_graphs() == 2
    assert EngineConfig(steps_in_flight=2).resolved_decode_graphs() == 2  # 3 measured slower
    assert EngineConfig().resolved_steps_in_flight() == 2  # the host two steps ahead: the same rule
    assert EngineConfig(async_scheduling=False).resolved_decode_graphs() == 1
    assert EngineConfig(decode_graphs=1).resolved_decode_graphs() == 1
    assert EngineConfig().resolved_prefill_graphs() == 2  # as decode_graphs unless given
    assert EngineConfig(decode_graphs=1).resolved_prefill_graphs() == 1
    assert EngineConfig(prefill_graphs=1).resolved_prefill_graphs() == 1
    assert EngineConfig().resolved_launch_thread()  # the launch thread: the same rule
    assert not EngineConfig(async_scheduling=False).resolved_launch_thread()
    assert not EngineConfig(launch_thread=False).resolved_launch_thread()


def _staggered(engine, threads: set[str] | None = None) -> dict[str, list[int]]:
    """Five requests arriving over the first steps (prefills beside decode rows, tokens fed from
    the prefill in flight), greedy and seeded sampling, more than the slots and pages hold at once
    (queueing, preemption)."""
    if threads is not None:
        real = engine.runner._decode_call

        def recording(*args):
            threads.add(threading.current_thread().name)
            return real(*args)

        engine.runner._decode_call = recording
    arrivals = {0: [("a", [5, 6, 7], 0.0)], 1: [("b", [8, 9], 0.8), ("c", [3] * 9, 0.0)],
                3: [("d", [4, 4, 2], 1.0)], 4: [("e", [7] * 5, 0.0)]}
    tokens: dict[str, list[int]] = {}
    step = 0
    while step < 5 or engine.has_unfinished():
        for rid, prompt, temp in arrivals.get(step, []):
            tokens[rid] = []
            engine.add_request(rid, prompt, SamplingParams(max_tokens=9, ignore_eos=True, temperature=temp,
                                                           seed=11))
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return tokens


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_launch_thread_gives_the_inline_engines_tokens(mode):
    """launch_thread: the runner's device calls are issued from the launcher's thread, in order, while
    the engine goes on with the step before's tokens; every token equals the inline engine's, with
    prefills joining decode rows, sampled rows, and preemption (recompute and swap) on a small pool."""
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    cfg = EngineConfig(num_slots=3, page_size=4, num_pages=9, max_model_len=32, prefill_buckets=(8,),
                       max_prefill_tokens_per_step=16, kernel_impl="reference", preemption_mode=mode)
    inline = LLMEngine(model, config=cfg)
    threaded = LLMEngine(model, config=dataclasses.replace(cfg, launch_thread=True))
    threads: set[str] = set()
    want, got = _staggered(inline), _staggered(threaded, threads)
    assert got == want and all(len(t) == 9 for t in want.values())
    # the GPU's deeper pipeline: two steps in flight, launch thread, two decode executables (the
    # default) or three (one per call in flight)
    for graphs in (2, 3):
        deep = LLMEngine(model, config=dataclasses.replace(cfg, launch_thread=True, steps_in_flight=2,
                                                           decode_graphs=graphs))
        assert _staggered(deep) == want and deep.scheduler.blocks.num_used == 0
    assert threads and all(t.startswith("jtrail-launch") for t in threads)
    assert threaded.num_preemptions == inline.num_preemptions > 0
    assert threaded.scheduler.blocks.num_used == 0  # every page back


def test_decode_gemms_choice_and_its_compiled_calls(monkeypatch):
    """decode_gemms: cuBLAS GEMMs (XLA's Triton GEMMs off for that compilation) for multi-token decode
    calls on a GPU, XLA's choice elsewhere; a bad value is refused naming the field. The cuBLAS variant
    runs the same program (here on the CPU, where the option changes nothing): same tokens."""
    with pytest.raises(ValueError, match="decode_gemms"):
        EngineConfig(decode_gemms="triton")
    assert EngineConfig(decode_steps_per_call=8).resolved_decode_gemms() == "xla"  # the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert EngineConfig(decode_steps_per_call=8).resolved_decode_gemms() == "cublas"
    assert EngineConfig().resolved_decode_gemms() == "xla"  # one token per call: its step was slower
    assert EngineConfig(decode_steps_per_call=8, decode_gemms="xla").resolved_decode_gemms() == "xla"
    monkeypatch.undo()
    from jtrail.serving.engine.step_programs import _DECODE_CALLS, _DECODE_CALLS_CUBLAS

    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    base = dataclasses.replace(_engine(model).config, decode_steps_per_call=3, async_scheduling=False)
    tokens = {}
    for gemms in ("xla", "cublas"):
        engine = LLMEngine(model, config=dataclasses.replace(base, decode_gemms=gemms))
        assert engine.runner._decode_calls is (_DECODE_CALLS_CUBLAS if gemms == "cublas" else _DECODE_CALLS)
        for i in range(2):
            engine.add_request(f"r{i}", [5 + i, 9, 11], SamplingParams(max_tokens=7, ignore_eos=True))
        got = {}
        while engine.has_unfinished():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
        tokens[gemms] = got
    assert tokens["xla"] == tokens["cublas"] and all(len(t) == 7 for t in tokens["xla"].values())
