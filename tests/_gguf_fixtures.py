"""Write small GGUF files the way llama.cpp's converter does (q/k rows permuted), for loader tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (the operation our loader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(
    path: Path,
    sd: dict[str, np.ndarray],
    *,
    n_layers: int,
    n_heads: int,
    n_kv: int,
    ffn: int,
    d: int,
    vocab: int,
    theta: float = 10000.0,
    eps: float = 1e-5,
    arch: str = "llama",
    quant: gguf.GGMLQuantizationType | None = None,
) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_dimension_count(d // n_heads)
    w.add_vocab_size(vocab)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(n_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, arr in sd.items():
        if hf not in names:
            continue
        if hf == "lm_head.weight" and np.array_equal(arr, sd["model.embed_tokens.weight"]):
            continue  # tied: llama.cpp writes no output.weight
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if hf.endswith("q_proj.weight"):
            arr = permute_qk(arr, n_heads)
        elif hf.endswith("k_proj.weight"):
            arr = permute_qk(arr, n_kv)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(names[hf], gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(names[hf], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
