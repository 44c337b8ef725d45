"""Llama-family decoder in Flax NNX: RMSNorm, RoPE (with Llama-3 scaling), GQA, SwiGLU.

Weights are stored [in, out]. Attention is a pluggable function (see `attention.py`), so the same
model runs with no cache, a contiguous cache, or the paged Pallas kernels of the serving engine.
The forward can also return the hidden state after one chosen layer: the probe tap of TRAIL.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionFn, dense_causal_attention, unpack_qkv
from .config import ModelConfig, RopeScaling
from .fused import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_mid, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, ..., D] (heads in the middle dims); rotate-half convention of Hugging Face Llama."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    heads = (1,) * (x.ndim - 3)
    cos = jnp.cos(angles).reshape(*angles.shape[:2], *heads, -1)
    sin = jnp.sin(angles).reshape(*angles.shape[:2], *heads, -1)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rope_rows(positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """positions [B] -> [B, 2, D] float32: [cos, cos] and [-sin, sin] of apply_rope's angles, so that
    x * rows[:, 0] + x[(i + D/2) % D] * rows[:, 1] is apply_rope(x) (the form a kernel applies per row:
    kernels.reference.rotate_rows)."""
    angles = positions[:, None].astype(jnp.float32) * inv_freq  # [B, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.stack([jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)], axis=1)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _init_dense(rngs: nnx.Rngs, fan_in: int, fan_out: int, param_dtype) -> jax.Array:
    return nnx.initializers.normal(stddev=fan_in ** -0.5)(rngs.params(), (fan_in, fan_out), param_dtype)


def _dense(rngs: nnx.Rngs, fan_in: int, fan_out: int, param_dtype) -> nnx.Param:
    return nnx.Param(_init_dense(rngs, fan_in, fan_out, param_dtype))


class Block(nnx.Module):
    """One decoder layer. q/k/v and gate/up are fused weights (`fused.py`: one GEMM each, column
    order that keeps tensor-parallel splits per head); `q_proj` ... `up_proj` read the parts back."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.dtype = dtype
        self.attn_norm = RMSNorm(d, cfg.norm_eps, param_dtype)
        # Drawn one by one in the order of the unfused model, so a seed gives the same weights.
        q = _init_dense(rngs, d, cfg.n_heads * hd, param_dtype)
        k = _init_dense(rngs, d, cfg.n_kv_heads * hd, param_dtype)
        v = _init_dense(rngs, d, cfg.n_kv_heads * hd, param_dtype)
        self.qkv_proj = nnx.Param(fuse_qkv(q, k, v, cfg))
        self.o_proj = _dense(rngs, cfg.n_heads * hd, d, param_dtype)
        if cfg.attention_bias:
            n_qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
            self.qkv_bias = nnx.Param(jnp.zeros((n_qkv,), param_dtype))
        self.mlp_norm = RMSNorm(d, cfg.norm_eps, param_dtype)
        gate = _init_dense(rngs, d, cfg.ffn_dim, param_dtype)
        up = _init_dense(rngs, d, cfg.ffn_dim, param_dtype)
        self.gate_up_proj = nnx.Param(fuse_gate_up(gate, up))
        self.down_proj = _dense(rngs, cfg.ffn_dim, d, param_dtype)

    # Unfused views [in, out] for inspection and tests (the forward uses the fused weights).
    @property
    def q_proj(self) -> jax.Array:
        return split_qkv(self.qkv_proj[...], self.cfg)[0]

    @property
    def k_proj(self) -> jax.Array:
        return split_qkv(self.qkv_proj[...], self.cfg)[1]

    @property
    def v_proj(self) -> jax.Array:
        return split_qkv(self.qkv_proj[...], self.cfg)[2]

    @property
    def gate_proj(self) -> jax.Array:
        return split_gate_up(self.gate_up_proj[...])[0]

    @property
    def up_proj(self) -> jax.Array:
        return split_gate_up(self.gate_up_proj[...])[1]

    def _proj(self, x, w, bias_name: str | None = None):
        y = x @ w[...].astype(self.dtype)
        if bias_name is not None and self.cfg.attention_bias:
            y = y + getattr(self, bias_name)[...].astype(self.dtype)
        return y

    def __call__(self, x, positions, inv_freq, layer_cache, attn_fn: AttentionFn, meta):
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.attn_norm(x)
        hkv, g = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
        # one GEMM for q, k and v; per kv head: its G query heads, then k, then v (fused.py)
        qkv = self._proj(h, self.qkv_proj, "qkv_bias").reshape(b, t, hkv, g + 2, cfg.head_dim)
        # an attention fn that rotates q and k itself takes the raw rows (None: not this call)
        rotary = getattr(attn_fn, "rotary_qkv", None)
        done = rotary(qkv, positions, inv_freq, layer_cache, meta) if rotary is not None else None
        if done is not None:
            attn, layer_cache = done
        else:
            # q and k rotated in one pass that copies v through: one array (and one fusion) for all three
            is_v = (jnp.arange(g + 2) == g + 1)[:, None]
            qkv = jnp.where(is_v, qkv, apply_rope(qkv, positions, inv_freq))
            packed = getattr(attn_fn, "packed_qkv", None)  # reads q, k, v in place (attention.py)
            if packed is not None:
                attn, layer_cache = packed(qkv, layer_cache, meta)
            else:
                attn, layer_cache = attn_fn(*unpack_qkv(qkv), layer_cache, meta)
        x = x + self._proj(attn.reshape(b, t, cfg.n_heads * cfg.head_dim), self.o_proj)
        h = self.mlp_norm(x)
        gate_up = self._proj(h, self.gate_up_proj).reshape(b, t, cfg.ffn_dim, 2)  # one GEMM
        mlp = jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1]
        return x + self._proj(mlp, self.down_proj), layer_cache


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V], or [B, V] / [B, K, V] when logits_index [B] / [B, K] is given
    caches: Any  # the updated per-layer caches (same structure as given)
    tap: jax.Array | None  # hidden state after layer `tap_layer`: [B, T, d_model]
    # (a tuple of layers gives them stacked: [n_taps, B, T, d_model])


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None,
                 rngs: nnx.Rngs | None = None):
        param_dtype = param_dtype or dtype
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                                             param_dtype))
        self.layers = nnx.List([Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(rngs, cfg.d_model, cfg.vocab_size, param_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, caches: Any = None,
                 attn_fn: AttentionFn = dense_causal_attention, meta: Any = None,
                 tap_layer: int | tuple[int, ...] | None = None,
                 logits_index: jax.Array | None = None) -> ModelOutput:
        """tokens/positions [B, T]. `tap_layer` L returns the hidden state after layer L (0-based:
        L = 0 is the output of the first block). `logits_index` [B] picks one position per row before
        the LM head, so prefill does not compute logits for every prompt token ([B, K]: K positions per
        row, logits [B, K, V])."""
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        caches = list(caches) if caches is not None else [None] * cfg.n_layers
        tap = None
        # A tuple of layers (probe training sweeps layers in one forward) stacks their states.
        taps = {} if isinstance(tap_layer, tuple) else None
        for i, layer in enumerate(self.layers):
            x, caches[i] = layer(x, positions, inv_freq, caches[i], attn_fn, meta)
            if taps is not None and i in tap_layer:
                taps[i] = x
            elif tap_layer is not None and i == tap_layer:
                tap = x
        if taps is not None:
            missing = [t for t in tap_layer if t not in taps]
            if missing:
                raise ValueError(f"tap layers {missing} out of range for {cfg.n_layers} layers")
            tap = jnp.stack([taps[t] for t in tap_layer])
        if logits_index is not None and logits_index.ndim == 2:
            x = jnp.take_along_axis(x, logits_index[:, :, None], axis=1)
        elif logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
        x = self.final_norm(x)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.dot(x, head.astype(self.dtype), preferred_element_type=jnp.float32)
        return ModelOutput(logits, caches, tap)
