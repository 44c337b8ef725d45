"""Fused q/k/v and gate/up weights (models/fused.py): exact inverses, tensor-parallel splits that keep
each device's heads together, and format-1 (unfused) checkpoints restoring into the fused model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jtrail.models.checkpoint import CONFIG_FILE, config_to_json, restore_checkpoint
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.fused import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from jtrail.models.llama import Llama

WIDE = NAMED_CONFIGS["tiny"].replace(name="wide", n_heads=8, n_kv_heads=4, attention_bias=True)


def _parts(cfg, rng, lead=(6,)):
    hd = cfg.head_dim
    return tuple(rng.standard_normal((*lead, n * hd), np.float32)
                 for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads))


@pytest.mark.parametrize("lead", [(6,), ()])  # weights [in, out] and biases [out]
def test_split_inverts_fuse(lead):
    rng = np.random.default_rng(0)
    q, k, v = _parts(WIDE, rng, lead)
    for back, ref in zip(split_qkv(fuse_qkv(q, k, v, WIDE), WIDE), (q, k, v), strict=True):
        np.testing.assert_array_equal(back, ref)
    g, u = rng.standard_normal((*lead, 10)), rng.standard_normal((*lead, 10))
    for back, ref in zip(split_gate_up(fuse_gate_up(g, u)), (g, u), strict=True):
        np.testing.assert_array_equal(back, ref)
    # jax arrays take the same path (random init fuses inside jit)
    np.testing.assert_array_equal(np.asarray(fuse_qkv(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), WIDE)),
                                  fuse_qkv(q, k, v, WIDE))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_contiguous_column_split_keeps_heads_together(tp):
    """Device i of a column split gets the fused weights of its kv heads and their query group,
    built here independently from head-major q/k/v column slices."""
    rng = np.random.default_rng(1)
    q, k, v = _parts(WIDE, rng)
    fused = fuse_qkv(q, k, v, WIDE)
    hd, nq, nkv = WIDE.head_dim, WIDE.n_heads // tp, WIDE.n_kv_heads // tp
    shard_cfg = WIDE.replace(n_heads=nq, n_kv_heads=nkv)
    for i, piece in enumerate(np.split(fused, tp, axis=-1)):
        cols_q, cols_kv = slice(i * nq * hd, (i + 1) * nq * hd), slice(i * nkv * hd, (i + 1) * nkv * hd)
        np.testing.assert_array_equal(piece, fuse_qkv(q[:, cols_q], k[:, cols_kv], v[:, cols_kv], shard_cfg))
    g, u = rng.standard_normal((6, 12)), rng.standard_normal((6, 12))
    f = 12 // tp
    for i, piece in enumerate(np.split(fuse_gate_up(g, u), tp, axis=-1)):
        np.testing.assert_array_equal(piece, fuse_gate_up(g[:, i * f:(i + 1) * f], u[:, i * f:(i + 1) * f]))


def test_format1_checkpoint_restores_fused(tmp_path):
    """A checkpoint written before the fusion (separate q/k/v/gate/up, format_version 1) restores to the
    same weights and logits."""
    import orbax.checkpoint as ocp

    cfg = WIDE
    model = Llama(cfg, rngs=nnx.Rngs(3))
    for layer in model.layers:  # non-zero biases, so their fusion is checked too
        layer.qkv_bias.set_value(jnp.arange(layer.qkv_bias.shape[0], dtype=jnp.float32) * 1e-3)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for i, layer in enumerate(model.layers):
        entry = pure["layers"][i]
        del entry["qkv_proj"], entry["gate_up_proj"], entry["qkv_bias"]
        entry.update(q_proj=layer.q_proj, k_proj=layer.k_proj, v_proj=layer.v_proj,
                     gate_proj=layer.gate_proj, up_proj=layer.up_proj)
        entry["q_bias"], entry["k_bias"], entry["v_bias"] = split_qkv(layer.qkv_bias[...], cfg)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "params", pure)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config_to_json(cfg), "format_version": 1}))
    _, restored, _ = restore_checkpoint(tmp_path)
    want, got = nnx.state(model, nnx.Param), nnx.state(restored, nnx.Param)
    for a, b in zip(nnx.to_flat_state(want), nnx.to_flat_state(got), strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))
    tokens, pos = jnp.array([[5, 9, 17, 3]]), jnp.arange(4)[None]
    np.testing.assert_array_equal(np.asarray(model(tokens, pos).logits),
                                  np.asarray(restored(tokens, pos).logits))
