"""Hugging Face directories: `config.json` + `*.safetensors` (sharded or not) + `tokenizer.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig, RopeScaling
from .errors import CorruptCheckpointError, ModelFileError, UnknownModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from e


def hf_config(raw: dict, name: str = "hf") -> ModelConfig:
    """ModelConfig from a transformers `config.json` dict (v4 and v5 spellings of RoPE settings)."""
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnknownModelError(
            f"unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {SUPPORTED_ARCHITECTURES}"
        )
    # transformers v5 moves rope_theta/rope_scaling into `rope_parameters`.
    rope = dict(raw.get("rope_scaling") or {})
    rope.update(raw.get("rope_parameters") or {})
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = None
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise UnknownModelError(f"unsupported rope scaling type {rope_type!r}")
    d, nh = raw["hidden_size"], raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    qwen = "Qwen2ForCausalLM" in archs
    return ModelConfig(
        name=name,
        vocab_size=raw["vocab_size"],
        d_model=d,
        n_layers=raw["num_hidden_layers"],
        n_heads=nh,
        n_kv_heads=raw.get("num_key_value_heads") or nh,
        head_dim=raw.get("head_dim") or d // nh,
        ffn_dim=raw["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", qwen)),
        max_model_len=int(raw.get("max_position_embeddings", 4096)),
        bos_id=raw.get("bos_token_id"),
        eos_ids=eos_ids,
    )


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        files = [path / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors files in {path}")
    return files


def hf_state_dict(path: Path, progress: bool = True) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    sd: dict[str, np.ndarray] = {}
    for f in tqdm(
        safetensors_files(path), desc="load safetensors", unit="shard", disable=not progress, leave=False
    ):
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CorruptCheckpointError(f"cannot read {f}: {e}") from e
    return sd


def load_hf_dir(path: str | os.PathLike, progress: bool = True) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFileError(f"{path} is not a Hugging Face model directory (no config.json)")
    cfg = hf_config(_read_json(path / "config.json"), name=path.name)
    return cfg, hf_state_dict(path, progress)
