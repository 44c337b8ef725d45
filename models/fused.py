"""Fused projection layouts: q/k/v in one weight, gate/up in another (one GEMM each per layer).

A decode step of a small model is bound by kernel launches, not bytes, so every layer multiplies the
normed hidden state once for attention and once for the MLP instead of five times. Weights are fused
once, when they are created or loaded; checkpoints in the Hugging Face naming (GGUF, safetensors)
keep their separate tensors and are fused by `models/weights.py`.

Column order is chosen so that a contiguous column split over tensor-parallel devices (the Megatron
column-parallel layout of `sharding.py`) keeps each device's heads together, for any degree that
divides the kv heads / FFN width:

  qkv_proj [d, Hkv * (G + 2) * D]: per kv head g, its G = Hq / Hkv query heads (q heads g*G .. g*G+G-1,
      the GQA group), then k head g, then v head g. Device i of tp gets kv heads [i*Hkv/tp, ...): whole
      groups, exactly the q/k/v heads its attention shard needs.
  gate_up_proj [d, F * 2]: column 2f is gate f, column 2f + 1 is up f, so a split gives each device
      the same F range of both.

Biases (Qwen2's q/k/v) follow the same column order. Every function works on numpy (host, at load
time) and jax arrays (random init inside jit), on the last axis, so weights [in, out] and biases [out]
share the code.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def _xp(a: Any):
    return np if isinstance(a, np.ndarray) else jnp


def fuse_qkv(q: Any, k: Any, v: Any, cfg: ModelConfig) -> Any:
    """q [..., Hq*D], k/v [..., Hkv*D] (head-major columns) -> [..., Hkv*(G+2)*D]."""
    xp, hkv, d = _xp(q), cfg.n_kv_heads, cfg.head_dim
    g = cfg.n_heads // hkv
    lead = q.shape[:-1]
    parts = [q.reshape(*lead, hkv, g, d), k.reshape(*lead, hkv, 1, d), v.reshape(*lead, hkv, 1, d)]
    return xp.concatenate(parts, axis=-2).reshape(*lead, hkv * (g + 2) * d)


def split_qkv(qkv: Any, cfg: ModelConfig) -> tuple[Any, Any, Any]:
    """Inverse of fuse_qkv on the last axis: -> q [..., Hq*D], k [..., Hkv*D], v [..., Hkv*D]."""
    hkv, d = cfg.n_kv_heads, cfg.head_dim
    g = cfg.n_heads // hkv
    lead = qkv.shape[:-1]
    y = qkv.reshape(*lead, hkv, g + 2, d)
    return (y[..., :g, :].reshape(*lead, hkv * g * d), y[..., g, :].reshape(*lead, hkv * d),
            y[..., g + 1, :].reshape(*lead, hkv * d))


def fuse_gate_up(gate: Any, up: Any) -> Any:
    """gate/up [..., F] -> [..., F*2] (gate f at column 2f, up f at 2f + 1)."""
    xp = _xp(gate)
    return xp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def split_gate_up(gate_up: Any) -> tuple[Any, Any]:
    """Inverse of fuse_gate_up: -> gate [..., F], up [..., F]."""
    y = gate_up.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2, 2)
    return y[..., 0], y[..., 1]
