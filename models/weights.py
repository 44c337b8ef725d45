"""Map a Hugging Face-named state dict (numpy, [out, in] layout) onto a `Llama` module.

Every loader (GGUF, safetensors directory) converts to this one naming, so there is one mapping:

    model.embed_tokens.weight, model.norm.weight, lm_head.weight,
    model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight,
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias for q/k/v on Qwen2),
    model.layers.{i}.mlp.{gate,up,down}_proj.weight

q/k/v and gate/up are fused here, on the host, into the model's fused weights (`fused.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .errors import JtrailError
from .fused import fuse_gate_up, fuse_qkv
from .llama import Llama


class WeightMismatchError(JtrailError, ValueError):
    """A checkpoint tensor is missing or has the wrong shape for the configured model."""


def _expect(sd: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in sd:
        raise WeightMismatchError(f"checkpoint is missing tensor {name!r}")
    arr = np.asarray(sd[name])
    if tuple(arr.shape) != shape:
        raise WeightMismatchError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
    return arr


def build_model(cfg: ModelConfig, state_dict: Mapping[str, np.ndarray], dtype=jnp.float32) -> Llama:
    """Create a Llama for `cfg` (no random init of real size) and fill it from `state_dict`."""
    model = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    load_state_dict(model, cfg, state_dict, dtype)
    return model


def load_state_dict(model: Llama, cfg: ModelConfig, sd: Mapping[str, np.ndarray], dtype=jnp.float32) -> None:
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    nq, nkv = cfg.n_heads * hd, cfg.n_kv_heads * hd

    def put(param: nnx.Param, arr: np.ndarray, transpose: bool) -> None:
        arr = arr.T if transpose else arr
        param.set_value(jnp.asarray(arr, dtype=dtype))

    put(model.embed, _expect(sd, "model.embed_tokens.weight", (cfg.vocab_size, d)), False)
    put(model.final_norm.weight, _expect(sd, "model.norm.weight", (d,)), False)
    if not cfg.tie_embeddings:
        put(model.lm_head, _expect(sd, "lm_head.weight", (cfg.vocab_size, d)), True)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        put(layer.attn_norm.weight, _expect(sd, p + "input_layernorm.weight", (d,)), False)
        put(layer.mlp_norm.weight, _expect(sd, p + "post_attention_layernorm.weight", (d,)), False)
        q = _expect(sd, p + "self_attn.q_proj.weight", (nq, d)).T
        k = _expect(sd, p + "self_attn.k_proj.weight", (nkv, d)).T
        v = _expect(sd, p + "self_attn.v_proj.weight", (nkv, d)).T
        put(layer.qkv_proj, fuse_qkv(q, k, v, cfg), False)
        put(layer.o_proj, _expect(sd, p + "self_attn.o_proj.weight", (d, nq)), True)
        if cfg.attention_bias:
            put(layer.qkv_bias, fuse_qkv(_expect(sd, p + "self_attn.q_proj.bias", (nq,)),
                                         _expect(sd, p + "self_attn.k_proj.bias", (nkv,)),
                                         _expect(sd, p + "self_attn.v_proj.bias", (nkv,)), cfg), False)
        put(layer.gate_up_proj, fuse_gate_up(_expect(sd, p + "mlp.gate_proj.weight", (f, d)).T,
                                             _expect(sd, p + "mlp.up_proj.weight", (f, d)).T), False)
        put(layer.down_proj, _expect(sd, p + "mlp.down_proj.weight", (d, f)), True)
