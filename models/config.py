"""Model shape configuration for the Llama family (Llama 2/3, SmolLM2, Qwen2-, Mistral-style)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UnknownModelError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 uses biases on q/k/v
    max_model_len: int = 4096  # the model's context limit (positions it was trained for)
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.ffn_dim
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.d_model) + emb + self.d_model


# Named shapes for random-init speed benchmarks and tests.
NAMED_CONFIGS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
        head_dim=64, ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
        max_model_len=8192, bos_id=1, eos_ids=(2,),
    ),
    "llama3-1b": ModelConfig(
        name="llama3-1b", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        head_dim=64, ffn_dim=8192, rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        norm_eps=1e-5, tie_embeddings=True, max_model_len=131072, bos_id=128000, eos_ids=(128001, 128009),
    ),
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, ffn_dim=14336, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        norm_eps=1e-5, tie_embeddings=False, max_model_len=8192, bos_id=128000, eos_ids=(128001, 128009),
    ),
    # Tiny shape for fast CPU tests: GQA ratio 2, tied embeddings.
    "tiny": ModelConfig(
        name="tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=128, rope_theta=10000.0, tie_embeddings=True, max_model_len=512, bos_id=1, eos_ids=(2,),
    ),
}


def named_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model shape {name!r}; known: {sorted(NAMED_CONFIGS)}") from None
