"""Decode with q, k and v read in place from the fused projection equals decode on their slices.

One decode forward of the SmolLM2 shape (random bf16 weights, a random paged cache, the engine's GPU
kernels) through the paged attention fn with its `packed_qkv` (the kernels read the [B, Hkv, G + 2, D]
array whole) and through the same fn without it (q, k and v sliced out by XLA): logits must be bitwise
equal. `python -m jtrail.bench.qkv_in_place` (H200, 2026-12-04: equal at batch 32 and 128).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrail.bench import step_breakdown as sb
from jtrail.serving.engine.step_programs import PagedMeta, make_paged_attention


def compare(batch: int, page: int = 16, pages_per_seq: int = 52) -> dict:
    model = sb.random_model(sb.CFG, seed=0)
    cfg, (graphdef, state) = model.cfg, nnx.split(model)
    in_place = make_paged_attention("auto")

    def sliced(q, k, v, cache, meta):  # the same fn without its packed_qkv attribute
        return in_place(q, k, v, cache, meta)

    rng = np.random.default_rng(batch)
    num_pages = 1 + batch * pages_per_seq
    shape = (cfg.n_kv_heads, num_pages, page, cfg.head_dim)
    caches = [tuple(jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.bfloat16) for _ in range(2))
              for _ in range(cfg.n_layers)]
    tables = rng.permutation(num_pages - 1)[:batch * pages_per_seq].reshape(batch, -1) + 1
    tables = jnp.asarray(tables, jnp.int32)
    pos = jnp.asarray(rng.integers(100, pages_per_seq * page - 1, batch), jnp.int32)
    slots = (tables[jnp.arange(batch), pos // page] * page + pos % page).astype(jnp.int32)
    meta = PagedMeta(slots, tables, pos, jnp.ones(batch, jnp.int32))
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, 1)), jnp.int32)
    logits = {}
    for name, fn in (("in_place", in_place), ("sliced", sliced)):
        step = jax.jit(lambda st, c, fn=fn: nnx.merge(graphdef, st)(tokens, pos[:, None], c, fn, meta).logits)
        logits[name] = np.asarray(step(state, caches).astype(jnp.float32))
    a, b = logits["in_place"], logits["sliced"]
    return {"batch": batch, "bitwise_equal": bool(np.array_equal(a, b)),
            "max_abs_diff": float(np.abs(a - b).max()),
            "argmax_equal": float((a.argmax(-1) == b.argmax(-1)).mean())}


if __name__ == "__main__":
    for b in sb.BATCHES:
        print(compare(b), flush=True)
