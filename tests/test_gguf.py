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


def test_open_gguf_reads_what_ggufs_own_reader_reads(tmp_path):
    """open_gguf reads through a plain ndarray view of the memory map (for speed): every field and
    tensor must equal what gguf.GGUFReader itself reads from the same file, string arrays included."""
    path = tmp_path / "vocab.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list([f"tok{i}\u00e9" for i in range(300)])
    w.add_token_merges([f"t o{i}" for i in range(200)])
    w.add_token_scores(rng.standard_normal(300).astype(np.float32).tolist())
    w.add_tensor("token_embd.weight", rng.standard_normal((300, 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((4, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, theirs = open_gguf(path), gguf.GGUFReader(str(path))
    assert type(ours.data) is np.ndarray and isinstance(theirs.data, np.memmap)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        want, got = field.contents(), ours.fields[name].contents()
        assert (np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want), name
    assert ours.fields["tokenizer.ggml.tokens"].contents()[299] == "tok299\u00e9"
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(np.asarray(a.data), np.asarray(b.data))
