"""GGUF loading: q/k un-permutation, naming, metadata -> config, quantized tensors; checked against
transformers' LlamaForCausalLM running the original (un-permuted) weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from _gguf_fixtures import permute_qk, write_llama_gguf
from hypothesis import given, settings
from hypothesis import strategies as st
from jtrail.models.gguf_loader import gguf_config, load_gguf, open_gguf, unpermute_qk
from jtrail.models.loader import embedded_gguf_path
from jtrail.models.weights import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@settings(max_examples=25, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_unpermute_inverts_llama_cpp_permute(n_head, half, cols):
    w = np.random.default_rng(n_head * 100 + half).normal(size=(n_head * 2 * half, cols)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    if half > 1:  # a non-trivial permutation really moves rows
        assert not np.array_equal(permute_qk(w, n_head), w)


def _tiny_ref(tie: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tie,quant,tol", [(True, None, 1e-4), (False, gguf.GGMLQuantizationType.Q8_0, None)])
def test_gguf_roundtrip_matches_transformers(tmp_path, tie, quant, tol):
    ref_model, sd = _tiny_ref(tie)
    path = write_llama_gguf(
        tmp_path / "tiny.gguf", sd, n_layers=2, n_heads=4, n_kv=2, ffn=96, d=64, vocab=64, quant=quant
    )
    _, cfg, ours_sd = load_gguf(path, progress=False)
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (2, 4, 2, 16, 96)
    assert cfg.tie_embeddings == tie
    model = build_model(cfg, ours_sd)
    tokens = np.random.default_rng(0).integers(0, 64, size=(1, 9))
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(tokens, np.arange(9)[None]).logits)
    if quant is None:
        assert np.abs(got - ref).max() < tol
    else:
        # Q8_0 rounds weights; error stays small relative to the logits' scale, and argmax agrees mostly
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
        # the dequantized q rows are close to the originals (the un-permutation put them back)
        q = ours_sd["model.layers.0.self_attn.q_proj.weight"]
        assert np.abs(q - sd["model.layers.0.self_attn.q_proj.weight"]).max() < 0.02


def test_embedded_smollm2_metadata():
    reader = open_gguf(embedded_gguf_path())
    cfg = gguf_config(reader)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings, cfg.eos_ids) == (49152, 1e5, True, (2,))
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_1" in types  # the real file exercises a real quantization format
