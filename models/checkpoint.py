"""Orbax save/restore of converted params, with the config as JSON and the tokenizer alongside.

A converted checkpoint restores far faster than re-dequantizing a GGUF, and restores straight into
the requested dtype. Layout of a checkpoint directory:

    jtrail_config.json   ModelConfig (+ format version)
    params/              Orbax StandardCheckpointer tree of `nnx.state(model, nnx.Param)`

Format 2 holds the fused q/k/v and gate/up weights of `fused.py`; format 1 (separate q/k/v/gate/up
projections, before the fusion) still restores: its parts are fused on the way in.
    tokenizer.json       optional, pip `tokenizers` format
    tokenizer_meta.json  optional: bos/eos ids, chat template, special-token strings
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig, RopeScaling
from .errors import CorruptCheckpointError, ModelFileError
from .fused import fuse_gate_up, fuse_qkv
from .llama import Llama
from .tokenizer import Tokenizer

CONFIG_FILE = "jtrail_config.json"
FORMAT_VERSION = 2


def config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["eos_ids"] = list(cfg.eos_ids)
    return {"format_version": FORMAT_VERSION, "config": d}


def config_from_json(raw: dict) -> ModelConfig:
    try:
        d = dict(raw["config"])
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_ids"] = tuple(d.get("eos_ids", ()))
        if "max_seq_len" in d:  # checkpoints written before the context limit had one name
            d["max_model_len"] = d.pop("max_seq_len")
        return ModelConfig(**d)
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"bad {CONFIG_FILE}: {e}") from e


def _unfused_target(target: dict, cfg: ModelConfig) -> dict:
    """The restore target of a format-1 checkpoint: per layer q/k/v/gate/up instead of the fused."""
    out = dict(target, layers={})
    for i, layer in target["layers"].items():
        layer = dict(layer)
        qkv, gu = layer.pop("qkv_proj"), layer.pop("gate_up_proj")
        parts = {"q_proj": cfg.n_heads * cfg.head_dim, "k_proj": cfg.n_kv_heads * cfg.head_dim,
                 "v_proj": cfg.n_kv_heads * cfg.head_dim, "gate_proj": cfg.ffn_dim, "up_proj": cfg.ffn_dim}
        for name, cols in parts.items():
            dtype = gu.dtype if name in ("gate_proj", "up_proj") else qkv.dtype
            layer[name] = jax.ShapeDtypeStruct((cfg.d_model, cols), dtype)
        if "qkv_bias" in layer:
            bias = layer.pop("qkv_bias")
            for name, cols in (("q_bias", parts["q_proj"]), ("k_bias", parts["k_proj"]),
                               ("v_bias", parts["v_proj"])):
                layer[name] = jax.ShapeDtypeStruct((cols,), bias.dtype)
        out["layers"][i] = layer
    return out


def _fuse_v1(restored: dict, cfg: ModelConfig) -> dict:
    out = dict(restored, layers={})
    for i, layer in restored["layers"].items():
        layer = dict(layer)
        layer["qkv_proj"] = fuse_qkv(layer.pop("q_proj"), layer.pop("k_proj"), layer.pop("v_proj"), cfg)
        layer["gate_up_proj"] = fuse_gate_up(layer.pop("gate_proj"), layer.pop("up_proj"))
        if "q_bias" in layer:
            layer["qkv_bias"] = fuse_qkv(layer.pop("q_bias"), layer.pop("k_bias"), layer.pop("v_bias"), cfg)
        out["layers"][i] = layer
    return out


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_checkpoint(path: str | os.PathLike, model: Llama, tokenizer: Tokenizer | None = None) -> Path:
    """Write params (Orbax), config and tokenizer to `path` (created; must not hold a checkpoint)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", nnx.to_pure_dict(state))
    (path / CONFIG_FILE).write_text(json.dumps(config_to_json(model.cfg), indent=1))
    if tokenizer is not None:
        tokenizer.backend.save(str(path / "tokenizer.json"))
        meta = {
            "bos_id": tokenizer.bos_id,
            "eos_ids": list(tokenizer.eos_ids),
            "add_bos": tokenizer.add_bos,
            "chat_template": tokenizer.chat_template,
            "special_tokens": tokenizer.special_tokens,
        }
        (path / "tokenizer_meta.json").write_text(json.dumps(meta, indent=1))
    return path


def restore_checkpoint(
    path: str | os.PathLike, dtype=jnp.float32
) -> tuple[ModelConfig, Llama, Tokenizer | None]:
    import orbax.checkpoint as ocp
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path).absolute()
    if not is_checkpoint_dir(path):
        raise ModelFileError(f"{path} is not a jtrail checkpoint (no {CONFIG_FILE})")
    try:
        cfg = config_from_json(json.loads((path / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"bad {path / CONFIG_FILE}: {e}") from e
    version = json.loads((path / CONFIG_FILE).read_text()).get("format_version", 1)
    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    if version == 1:
        target = _unfused_target(target, cfg)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(path / "params", target)
    except Exception as e:  # orbax raises many kinds (FileNotFoundError, ValueError, tensorstore errors)
        raise CorruptCheckpointError(f"cannot restore params from {path / 'params'}: {e}") from e
    if version == 1:
        restored = _fuse_v1(restored, cfg)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    tok = None
    if (path / "tokenizer.json").is_file():
        meta = json.loads((path / "tokenizer_meta.json").read_text())
        tok = Tokenizer(
            HFTokenizer.from_file(str(path / "tokenizer.json")),
            meta["bos_id"],
            tuple(meta["eos_ids"]),
            meta["chat_template"],
            meta["add_bos"],
            meta["special_tokens"],
        )
    return cfg, model, tok
