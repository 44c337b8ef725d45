"""Issue 18: `jtrail serve` compiles before it reports ready (warm-up), then prints what it serves."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.probe import ProbeConfig, ProbeHead
from jtrail.models.probe_io import save_probe
from jtrail.serving.engine.step_programs import BACKEND_COMPILES
from jtrail.serving.engine.warmup import _prompts_for
from jtrail.serving.sequence import SamplingParams

from jtrail.serve import add_serve_args, build_real_engine
from jtrail.warmup import banner


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("probe") / "probe")
    save_probe(path, ProbeHead(ProbeConfig(d_model=NAMED_CONFIGS["tiny"].d_model, layer=0, hidden=16),
                               rngs=nnx.Rngs(0)))
    return path


@pytest.mark.parametrize("with_probe", [False, True])
def test_no_compilation_after_warm_up_whatever_the_traffic(with_probe: bool, tiny_probe: str) -> None:
    # With a probe, whose weights are committed to the device, the KV caches were once created
    # uncommitted: after the first call they were committed, and the first warmed-up prefill shape
    # compiled again under traffic (3.4 s on the H200). Without one every argument stayed uncommitted.
    p = argparse.ArgumentParser()
    add_serve_args(p)
    probe = tiny_probe if with_probe else "none"
    args = p.parse_args(["--model", "tiny", "--probe", probe, "--policy", "fcfs", "--max-context", "96",
                         "--slots", "4", "--pages", "40", "--page-size", "16"])
    async_engine = build_real_engine(args)  # warms up
    engine = async_engine.engine
    assert not engine.has_unfinished()
    compiled = dict(engine.runner.trace_counts)
    # every XLA compile, not only retraces of the two jitted steps: an eager jnp op on the host path
    # (a slice of the packed call's rows, a stack of taps) compiled per new shape, ~4 s each on the H200
    backend = BACKEND_COMPILES["n"]
    rng = np.random.default_rng(0)
    vocab = engine.model_cfg.vocab_size
    for wave in range(5):  # bursts: several prompts packed in one prefill call, any length that fits
        # (the first wave: one short prompt alone, the smallest packed shape, which warm-up compiles first)
        for i in range(int(rng.integers(1, 7)) if wave else 1):
            n = int(rng.integers(1, 90)) if wave else 5
            # every other one samples with top-p: the steps that sort the vocabulary are warmed up too
            sampled = dict(temperature=0.8, top_p=0.9, seed=i) if i % 2 else {}
            engine.add_request(f"w{wave}-{i}", rng.integers(3, vocab, n).tolist(),
                               SamplingParams(max_tokens=int(rng.integers(1, 96 - n)), ignore_eos=True,
                                              **sampled))
        while engine.has_unfinished():
            engine.step()
    assert engine.runner.trace_counts == compiled
    assert BACKEND_COMPILES["n"] == backend

    if with_probe:
        return
    lines = banner(async_engine, {"gRPC": "127.0.0.1:1", "HTTP": "-"})
    assert "model tiny" in lines[0] and "float32" in lines[0] and "policy fcfs" in lines[0]
    assert "probe none" in lines[0] and "4 slots" in lines[1] and "40 pages x 16 tokens" in lines[1]
    assert "MiB" in lines[1] and "max context 96" in lines[1] and "gRPC 127.0.0.1:1" in lines[2]


class _Cfg:
    decode_steps_per_call, page_size, num_slots, num_pages = 1, 16, 8, 512


def test_prompts_fill_each_capacity_exactly() -> None:
    row, limit = 16, 125
    for prev, cap in ((0, 16), (32, 64), (64, 128), (128, 256), (256, 512)):
        lengths = _prompts_for(cap, prev, limit, row, _Cfg, 2)
        assert all(1 <= n <= limit for n in lengths)
        assert sum(-(-n // row) * row for n in lengths) == cap  # the packed call's padded size
    small = type("C", (), {**vars(_Cfg), "num_slots": 3})
    # 3 slots hold at most 3 x 128 padded tokens: capacity 512 is reached by 384 of them
    assert sum(-(-n // row) * row for n in _prompts_for(512, 256, limit, row, small, 2)) == 384
    two = type("C", (), {**vars(_Cfg), "num_slots": 2})
    assert _prompts_for(512, 256, limit, row, two, 2) == []  # 2 x 128 never needs more than 256


def test_warm_up_serves_an_srpt_oracle_engine() -> None:
    """srpt-oracle ranks by the true length: the warm-up's own requests carry theirs (it once raised
    'oracle_remaining_at_start' and the benchmark's oracle engine never started)."""
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--model", "tiny", "--probe", "none", "--policy", "srpt-oracle",
                         "--max-context", "64", "--slots", "2", "--pages", "16", "--page-size", "16"])
    engine = build_real_engine(args).engine  # warms up
    assert not engine.has_unfinished() and engine.policy.name == "srpt-oracle"
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    seq = engine.add_request("x", [5, 6, 7], params, oracle_length=3)
    assert seq.oracle_remaining_at_start == 3
    while engine.has_unfinished():
        engine.step()
    assert seq.num_generated == 3


def test_an_executable_loaded_from_the_persistent_cache_counts_as_a_compile() -> None:
    """The suite runs with a persistent compilation cache (conftest.py): a program another process
    compiled is loaded, not compiled, and the no-compile-under-traffic test above must still see it."""
    import jax
    import jax.numpy as jnp

    if not jax.config.jax_compilation_cache_dir:  # conftest.py sets one unless the caller turned it off
        pytest.skip("no persistent compilation cache in this run (JAX_COMPILATION_CACHE_DIR empty)")
    hits: list[str] = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)
    x = jnp.arange(7, dtype=jnp.float32)
    before = BACKEND_COMPILES["n"]
    f(x).block_until_ready()  # compiled (or loaded, when a neighbour ran it first)
    assert BACKEND_COMPILES["n"] == before + 1
    jax.clear_caches()  # the in-memory caches gone: the next call loads from the disk cache
    n_hits = len(hits)
    f(x).block_until_ready()
    assert len(hits) == n_hits + 1  # loaded, not compiled ...
    assert BACKEND_COMPILES["n"] == before + 2  # ... and counted all the same


def test_warm_up_compiles_both_decode_graphs() -> None:
    """decode_graphs=2: warm-up runs a decode call on each of the two executables, so traffic
    compiles nothing."""
    import jax.numpy as jnp
    from jtrail.models.llama import Llama
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine

    model = Llama(NAMED_CONFIGS["tiny"], dtype=jnp.float32, rngs=nnx.Rngs(0))
    engine = LLMEngine(model, config=EngineConfig(num_slots=2, page_size=4, num_pages=64, max_model_len=48,
                                                  prefill_buckets=(16,), max_prefill_tokens_per_step=16,
                                                  kernel_impl="reference", decode_graphs=2))
    engine.warmup(report=lambda line: None)
    backend = BACKEND_COMPILES["n"]
    for i, n in enumerate((3, 11, 16)):
        engine.add_request(f"r{i}", list(range(3, 3 + n)), SamplingParams(max_tokens=6, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert BACKEND_COMPILES["n"] == backend
