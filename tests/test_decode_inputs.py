"""The decode call's host side: its inputs travel as one packed int32 array (one host-to-device copy),
and the vocabulary is sorted only in steps where some row samples with top-p or top-k. Both must leave
every token unchanged: the packing round-trips bit for bit, and the unsorted path draws the same
tokens as the sorted one for rows that use neither filter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.sampling import needs_filter, sample_tokens
from jtrail.serving.engine.batch import SamplingRows
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.engine.step_inputs import (
    DecodeInputs,
    PrefillInputs,
    PrefillLayout,
    _prefill_slots,
    _unpack_decode_inputs,
    _unpack_prefill_inputs,
    pack_decode_inputs,
    pack_prefill_inputs,
)
from jtrail.serving.sequence import SamplingParams


def test_needs_filter_only_for_sampled_rows_with_top_p_or_top_k():
    t, p, k = np.array([0.0, 0.7]), np.array([1.0, 1.0]), np.array([0, 0])
    assert not needs_filter(t, p, k)
    assert not needs_filter(np.array([0.0, 0.7]), np.array([0.5, 1.0]), k)  # greedy row's top_p: unused
    assert needs_filter(t, np.array([1.0, 0.9]), k)
    assert needs_filter(t, p, np.array([0, 40]))
    assert not needs_filter(np.array([0.0, 0.0]), p, np.array([40, 40]))


def test_unsorted_sampling_draws_the_sorted_paths_tokens():
    rows, vocab = 64, 1000
    logits = jax.random.normal(jax.random.PRNGKey(0), (rows, vocab)) * 3.0
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(rows))
    temperature = jnp.asarray(np.tile([0.0, 0.5, 1.0, 1.7], rows // 4), jnp.float32)
    top_p, top_k = jnp.ones(rows, jnp.float32), jnp.zeros(rows, jnp.int32)
    sorted_path = np.asarray(sample_tokens(logits, keys, temperature, top_p, top_k, filtered=True))
    unsorted = np.asarray(sample_tokens(logits, keys, temperature, top_p, top_k, filtered=False))
    np.testing.assert_array_equal(unsorted, sorted_path)
    greedy = np.asarray(jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(unsorted[::4], greedy[::4])
    assert (unsorted[1::4] != greedy[1::4]).any()  # the sampled rows really sample


def test_packed_decode_inputs_round_trip():
    rng = np.random.default_rng(0)
    s, pages, steps = 5, 7, 3
    samp = SamplingRows(temperature=rng.random(s).astype(np.float32), top_p=rng.random(s).astype(np.float32),
                        top_k=rng.integers(0, 50, s).astype(np.int32),
                        seed=np.array([0, 1, 2**31, 2**32 - 1, 12345], np.uint32),
                        gen_index=rng.integers(0, 900, s).astype(np.int32),
                        forced=rng.integers(-1, 49152, (s, steps)).astype(np.int32))
    inputs = DecodeInputs(tokens=rng.integers(0, 100, s).astype(np.int32),
                          positions=rng.integers(0, 500, s).astype(np.int32),
                          n_valid=rng.integers(0, steps + 1, s).astype(np.int32),
                          block_tables=rng.integers(0, 2048, (s, pages)).astype(np.int32), samp=samp)
    packed = pack_decode_inputs(inputs)
    assert packed.dtype == np.int32 and packed.shape == (s, 7 + pages + steps)
    back = jax.jit(_unpack_decode_inputs, static_argnums=2)(jnp.asarray(inputs.tokens), jnp.asarray(packed),
                                                             steps)
    for name in ("tokens", "positions", "n_valid", "block_tables"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), getattr(inputs, name), err_msg=name)
    for name in SamplingRows._fields:
        got, want = np.asarray(getattr(back.samp, name)), getattr(samp, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("tap_width", [0, 6])
def test_packed_prefill_inputs_round_trip_and_slots_match_the_host_formula(tap_width):
    """The prefill call's one packed array gives back every field bit for bit, and the positions and KV
    slots the graph derives from (start, q_len, block table) are the ones the host used to compute."""
    rng = np.random.default_rng(1)
    r, t, pages, page_size = 6, 8, 5, 4
    samp = SamplingRows(temperature=rng.random(r).astype(np.float32), top_p=rng.random(r).astype(np.float32),
                        top_k=rng.integers(0, 50, r).astype(np.int32),
                        seed=np.array([0, 1, 2**31, 2**32 - 1, 12345, 7], np.uint32),
                        gen_index=rng.integers(0, 900, r).astype(np.int32),
                        forced=rng.integers(-1, 49152, (r, 1)).astype(np.int32))
    q_lens = np.array([8, 8, 3, 5, 0, 0], np.int32)  # two pad rows
    start = np.array([0, 8, 16, 4, 0, 0], np.int32)
    inputs = PrefillInputs(tokens=rng.integers(0, 100, (r, t)).astype(np.int32), start=start, q_lens=q_lens,
                           row_chunk=np.array([0, 0, 0, 1, 0, 0], np.int32),
                           last_row=np.array([2, 3, 0, 0, 0, 0], np.int32),
                           n_prompt=rng.integers(1, 40, r).astype(np.int32),
                           chunk_end=rng.integers(1, 40, r).astype(np.int32),
                           block_tables=rng.integers(0, 2048, (r, pages)).astype(np.int32),
                           tap_in=rng.standard_normal((r, tap_width)).astype(np.float32), samp=samp)
    layout = PrefillLayout(t, pages, tap_width)
    packed = pack_prefill_inputs(inputs)
    assert packed.dtype == np.int32 and packed.shape == (r, t + 12 + pages + tap_width)
    back = jax.jit(_unpack_prefill_inputs, static_argnums=1)(jnp.asarray(packed), layout)
    for name in PrefillInputs._fields[:-1]:
        got, want = np.asarray(getattr(back, name)), getattr(inputs, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    for name in SamplingRows._fields:
        got, want = np.asarray(getattr(back.samp, name)), getattr(samp, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    positions, slots = jax.jit(_prefill_slots, static_argnums=1)(back, page_size)
    want_slots = np.full((r, t), -1, np.int32)
    for i in range(r):  # the host's formula before the packing
        p = np.arange(start[i], start[i] + q_lens[i])
        want_slots[i, :q_lens[i]] = inputs.block_tables[i, p // page_size] * page_size + p % page_size
        np.testing.assert_array_equal(np.asarray(positions)[i], np.arange(start[i], start[i] + t))
    np.testing.assert_array_equal(np.asarray(slots), want_slots.reshape(-1))


def test_a_top_p_neighbour_leaves_a_temperature_only_request_unchanged(monkeypatch):
    """Alone, the request's steps take the unsorted variant; beside a top-p request, the sorted one."""
    from jtrail.serving.engine import model_runner

    variants: list[bool] = []

    def recording(*a):
        variants.append(needs_filter(*a))
        return variants[-1]

    monkeypatch.setattr(model_runner, "needs_filter", recording)
    model = Llama(NAMED_CONFIGS["tiny"], dtype=jnp.float32, rngs=nnx.Rngs(0))

    def engine():
        return LLMEngine(model, config=EngineConfig(num_slots=4, page_size=4, num_pages=64, max_model_len=64,
                                                    prefill_buckets=(8, 16), max_prefill_tokens_per_step=32,
                                                    kernel_impl="reference"))

    plain = SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    alone = engine()
    a = alone.add_request("a", [5, 6, 7, 8], plain)
    while alone.has_unfinished():
        alone.step()
    assert variants and not any(variants)
    variants.clear()
    busy = engine()
    b = busy.add_request("a", [5, 6, 7, 8], plain)
    busy.add_request("p", [9, 10, 11], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.8, seed=3,
                                                       ignore_eos=True))
    while busy.has_unfinished():
        busy.step()
    assert len(a.output_ids) == 12 and a.output_ids == b.output_ids
    assert all(variants[:11])  # "p" (20 tokens) outlives "a": every step of "a" sorted
