"""Bad input raises a clear typed error naming the problem (loaders, LLM API, CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _gguf_fixtures import write_llama_gguf
from jtrail.models.errors import CorruptCheckpointError, ModelFileError, UnknownModelError

from jtrail import LLM, InvalidRequestError, SamplingParams, load_model
from jtrail.cli import main


def _tiny_gguf(path, arch="llama"):
    rng = np.random.default_rng(0)
    d, f, v = 16, 32, 8
    sd = {"model.embed_tokens.weight": rng.normal(size=(v, d)), "model.norm.weight": np.ones(d)}
    for name, shape in [
        ("input_layernorm", (d,)),
        ("post_attention_layernorm", (d,)),
        ("self_attn.q_proj", (d, d)),
        ("self_attn.k_proj", (d, d)),
        ("self_attn.v_proj", (d, d)),
        ("self_attn.o_proj", (d, d)),
        ("mlp.gate_proj", (f, d)),
        ("mlp.up_proj", (f, d)),
        ("mlp.down_proj", (d, f)),
    ]:
        sd[f"model.layers.0.{name}.weight"] = rng.normal(size=shape)
    return write_llama_gguf(path, sd, n_layers=1, n_heads=2, n_kv=2, ffn=f, d=d, vocab=v, arch=arch)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", progress=False)


def test_missing_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelFileError, match="neither a Hugging Face model"):
        load_model(str(tmp_path))  # empty directory
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "vocab_size": 8,
            }
        )
    )
    with pytest.raises(ModelFileError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_unknown_architecture_and_name(tmp_path):
    with pytest.raises(UnknownModelError, match="llama3-9000"):
        load_model("llama3-9000")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnknownModelError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path))
    with pytest.raises(UnknownModelError, match="'gpt2'"):
        load_model(str(_tiny_gguf(tmp_path / "g.gguf", arch="gpt2")))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="unknown model file type"):
        load_model(str(tmp_path / "weights.bin"))


def test_corrupt_gguf(tmp_path):
    good = _tiny_gguf(tmp_path / "good.gguf").read_bytes()
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGML" + good[4:])
    with pytest.raises(CorruptCheckpointError, match="not a GGUF file"):
        load_model(str(bad_magic))
    for cut in (20, len(good) // 3, len(good) - 100):
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(good[:cut])
        with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
            load_model(str(trunc))


def test_corrupt_hf_and_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        load_model(str(tmp_path))
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "jtrail_config.json").write_text(json.dumps({"config": {"name": "x"}}))
    with pytest.raises(CorruptCheckpointError, match="jtrail_config.json"):
        load_model(str(ck))


def test_empty_prompt_and_bad_params(llm):
    for prompt in ["", "   \n"]:
        with pytest.raises(InvalidRequestError, match="prompt is empty") as ei:
            llm.generate(prompt)
        assert ei.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate([[]])
    with pytest.raises(InvalidRequestError, match="out of range"):
        llm.generate([[1, 999]])
    with pytest.raises(InvalidRequestError, match="do not fit"):
        llm.generate([[1] * llm.cfg.max_model_len])
    for n in (0, -3):
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            SamplingParams(max_tokens=n)
    with pytest.raises(InvalidRequestError, match="got 1 for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(InvalidRequestError, match="role"):
        llm.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="no non-empty user message"):
        llm.chat([{"role": "user", "content": " "}])


def test_cli_reports_typed_errors(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "ModelFileError" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "tiny", "--max-tokens", "0", "--no-chat"]) == 2
    assert "max_tokens" in capsys.readouterr().err
