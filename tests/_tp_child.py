"""Child process of test_tensor_parallel.py: runs with 4 fake CPU devices, prints one JSON line.

For each case, the same random-weight Llama runs on one device and tensor-parallel over a mesh:
a cache-free forward, then greedy generation (prefill + decode) with a contiguous cache and with a
paged cache driven by the kernels' write_kv / prefill_attention (reference impl) per kv-head shard.
"""

from __future__ import annotations

import json
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jtrail.kernels import ops
from jtrail.models.attention import (
    ContiguousMeta,
    contiguous_cache_attention,
    dense_causal_attention,
    init_contiguous_cache,
)
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.sharding import (
    init_sharded,
    make_mesh,
    shard_attention_fn,
    shard_kv_cache,
    shard_model,
)

B, PROMPT, STEPS, PAGE = 3, 8, 10, 4


class PagedMeta(NamedTuple):
    slot_mapping: jax.Array  # [B*T]
    q_start: jax.Array  # [B]
    q_lens: jax.Array  # [B]
    block_tables: jax.Array  # [B, pages_per_seq]


def paged_attention(q, k, v, layer_cache, meta: PagedMeta):
    k_pages, v_pages = layer_cache
    b, t, hkv, d = k.shape
    k_pages, v_pages = ops.write_kv(k_pages, v_pages, k.reshape(b * t, hkv, d), v.reshape(b * t, hkv, d),
                                    meta.slot_mapping, impl="reference")
    out = ops.prefill_attention(q, k_pages, v_pages, meta.q_start, meta.q_lens, meta.block_tables,
                                impl="reference")
    return out, (k_pages, v_pages)


def make_step(graphdef, attn_fn):
    @jax.jit
    def step(state, tokens, positions, caches, meta):
        out = nnx.merge(graphdef, state)(tokens, positions, caches, attn_fn, meta)
        return out.logits[:, -1], out.caches

    return step


def generate(model, attn_fn, caches, prompts, make_meta):
    """Greedy: prefill the prompts, then STEPS-1 decode steps. -> (tokens [B, STEPS], logits list)."""
    graphdef, state = nnx.split(model)
    step = make_step(graphdef, attn_fn)
    pos = jnp.broadcast_to(jnp.arange(PROMPT), (B, PROMPT))
    logits, caches = step(state, prompts, pos, caches, make_meta(pos))
    toks, all_logits = [jnp.argmax(logits, -1)], [logits]
    for i in range(STEPS - 1):
        pos = jnp.full((B, 1), PROMPT + i, jnp.int32)
        logits, caches = step(state, toks[-1][:, None], pos, caches, make_meta(pos))
        toks.append(jnp.argmax(logits, -1))
        all_logits.append(logits)
    return np.stack([np.asarray(t) for t in toks], 1), all_logits, caches


def paged_setup(cfg, mesh=None):
    per_seq = -(-(PROMPT + STEPS) // PAGE)
    num_pages = 1 + B * per_seq  # page 0 is the null page
    tables = 1 + jnp.arange(B * per_seq, dtype=jnp.int32).reshape(B, per_seq)
    shape = (cfg.n_kv_heads, num_pages, PAGE, cfg.head_dim)
    caches = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.n_layers)]
    if mesh is not None:
        caches = shard_kv_cache(caches, mesh, "paged")

    def meta(pos):
        slots = jnp.take_along_axis(tables, pos // PAGE, 1) * PAGE + pos % PAGE
        return PagedMeta(slots.reshape(-1).astype(jnp.int32), pos[:, 0].astype(jnp.int32),
                         jnp.full((B,), pos.shape[1], jnp.int32), tables)

    return caches, meta


def spec_list(arr) -> list:
    """The PartitionSpec padded to the array's rank (jax drops trailing Nones)."""
    spec = [None if a is None else str(a) for a in arr.sharding.spec]
    return spec + [None] * (arr.ndim - len(spec))


def run_case(cfg, tp: int) -> dict:
    mesh = make_mesh(tp)
    single, sharded = Llama(cfg, rngs=nnx.Rngs(0)), Llama(cfg, rngs=nnx.Rngs(0))
    for m in (single, sharded):
        # Random tied embeddings make the model echo its input; damp them so tokens vary.
        m.embed.set_value(m.embed[...] * 0.05)
    sharded = shard_model(sharded, mesh)
    rep: dict = {"tp": tp, "n_kv_heads": cfg.n_kv_heads}

    # Cache-free forward.
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    ref = jax.jit(lambda m, t, p: m(t, p).logits)(single, tokens, pos)
    tp_attn = shard_attention_fn(dense_causal_attention, mesh, "contiguous")
    out = nnx.jit(lambda m, t, p: m(t, p, attn_fn=tp_attn).logits)(sharded, tokens, pos)
    rep["dense_logits_max_abs_diff"] = float(jnp.max(jnp.abs(ref - out)))
    rep["dense_logits_std"] = float(jnp.std(ref))
    rep["n_devices_used"] = len(out.sharding.device_set)

    # Greedy generation: single device (contiguous cache) vs TP contiguous vs TP paged.
    prompts = jax.random.randint(jax.random.key(2), (B, PROMPT), 0, cfg.vocab_size)
    cont_meta = ContiguousMeta
    mk_cache = lambda: init_contiguous_cache(cfg.n_layers, B, PROMPT + STEPS, cfg.n_kv_heads, cfg.head_dim)
    t_ref, l_ref, _ = generate(single, contiguous_cache_attention, mk_cache(), prompts, cont_meta)
    t_tp, l_tp, c_tp = generate(sharded, shard_attention_fn(contiguous_cache_attention, mesh, "contiguous"),
                                shard_kv_cache(mk_cache(), mesh, "contiguous"), prompts, cont_meta)
    pcaches, pmeta = paged_setup(cfg, mesh)
    t_pg, _, c_pg = generate(sharded, shard_attention_fn(paged_attention, mesh, "paged"), pcaches, prompts,
                             pmeta)
    rep["tokens_single"] = t_ref.tolist()
    rep["tokens_tp_contiguous"] = t_tp.tolist()
    rep["tokens_tp_paged"] = t_pg.tolist()
    rep["step_logits_max_abs_diff"] = max(float(jnp.max(jnp.abs(a - b)))
                                          for a, b in zip(l_ref, l_tp, strict=True))
    rep["contiguous_spec"] = spec_list(c_tp[0][0])
    rep["contiguous_shard_shape"] = list(c_tp[0][0].addressable_shards[0].data.shape)
    rep["paged_spec"] = spec_list(c_pg[1][1])
    rep["paged_shard_shape"] = list(c_pg[1][1].addressable_shards[0].data.shape)

    # Where every weight went.
    specs, shard_shapes, shapes = {}, {}, {}
    for path, arr in jax.tree_util.tree_leaves_with_path(nnx.state(sharded)):
        name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path if
                        getattr(k, "name", None) != "value")
        specs[name], shapes[name] = spec_list(arr), list(arr.shape)
        shard_shapes[name] = list(arr.addressable_shards[0].data.shape)
    rep.update(param_specs=specs, param_shard_shapes=shard_shapes, param_shapes=shapes)

    # Random init made directly on the mesh equals the eager init.
    direct = init_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
    eager = jax.tree_util.tree_leaves(nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))
    rep["init_sharded_equal"] = all(  # jit fuses the init's scaling: equal up to f32 rounding
        bool(jnp.allclose(a, b, rtol=0, atol=1e-6))
        for a, b in zip(jax.tree_util.tree_leaves(nnx.state(direct)), eager, strict=True))
    rep["init_sharded_spec_q"] = spec_list(direct.layers[0].qkv_proj[...])
    return rep


def run_engine_case(cfg, tp: int) -> dict:
    """The serving engine with tensor_parallel=tp vs 1: same greedy tokens, with swap preemption."""
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
    from jtrail.serving.sequence import SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(rng.integers(2, 14))).tolist() for _ in range(6)]
    outs = {}
    for degree in (1, tp):
        model = Llama(cfg, rngs=nnx.Rngs(0))
        model.embed.set_value(model.embed[...] * 0.05)
        ecfg = EngineConfig(num_slots=4, page_size=4, num_pages=40, max_model_len=32, prefill_buckets=(16,),
                            max_prefill_tokens_per_step=32, decode_steps_per_call=2, kernel_impl="reference",
                            preemption_mode="swap", tensor_parallel=degree)
        engine = LLMEngine(model, config=ecfg)
        seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=8, ignore_eos=True))
                for i, p in enumerate(prompts)]
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps == 3 and engine.running:  # swap a request's (sharded) pages out and back in
                engine.preempt(engine.running[0])
        outs[degree] = [list(s.output_ids) for s in seqs]
        k_pages = engine.runner.caches[0][0]
    return {"tp": tp, "tokens_tp1": outs[1], "tokens_tp": outs[tp], "preemptions": engine.num_preemptions,
            "pages_spec": spec_list(k_pages),
            "pages_shard_shape": list(k_pages.addressable_shards[0].data.shape),
            "qkv_proj_spec": spec_list(engine.runner.state["layers"][0]["qkv_proj"][...])}


def main() -> None:
    assert len(jax.devices()) >= 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    tiny = NAMED_CONFIGS["tiny"]
    # 8 q / 4 kv heads so TP=4 is possible; untied lm_head and q/k/v biases exercise more specs.
    wide = tiny.replace(name="wide", n_heads=8, n_kv_heads=4, tie_embeddings=False, attention_bias=True)
    report = {"tiny_tp2": run_case(tiny, 2), "wide_tp4": run_case(wide, 4),
              "engine_tp2": run_engine_case(tiny, 2)}
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
