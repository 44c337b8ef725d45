"""Logits parity with Hugging Face transformers (the independent reference).

1. tiny random LlamaForCausalLM written with save_pretrained (GQA; tied and untied, sharded) -> our HF
   loader: 1e-4 max-abs in f32.
2. the embedded SmolLM2 Q4_1 GGUF loaded by transformers' own GGUF loader (gguf_file=) vs our GGUF
   loader on a real prompt: 1e-3 max-abs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jtrail.models.loader import embedded_gguf_path, load_model  # noqa: E402


def _tiny_hf(tmp_path, tie: bool, shard: str | None = None):
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    return model


@pytest.mark.parametrize("tie,shard", [(True, None), (False, "40KB")])
def test_hf_dir_parity_tiny(tmp_path, tie, shard):
    ref_model = _tiny_hf(tmp_path, tie, shard)
    if shard:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1  # really exercises the sharded path
    ours = load_model(str(tmp_path), progress=False)
    assert ours.cfg.tie_embeddings == tie and ours.cfg.n_kv_heads == 2
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, size=(2, 11))
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours.model(tokens, np.broadcast_to(np.arange(11), (2, 11))).logits)
    assert np.abs(got - ref).max() < 1e-4


@pytest.fixture(scope="module")
def smollm():
    return load_model(None, progress=False)


def test_gguf_parity_against_transformers_gguf_loader(smollm):
    pytest.importorskip("accelerate")  # transformers needs it for gguf_file=
    path = embedded_gguf_path()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = smollm.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(smollm.model(np.array([ids]), np.arange(len(ids))[None]).logits[0])
    assert np.abs(got - ref).max() < 1e-3
    # the same model ranks " Berlin" first after "... capital of Germany is"
    assert smollm.tokenizer.decode([int(got[-1].argmax())]).strip() == "Berlin"
