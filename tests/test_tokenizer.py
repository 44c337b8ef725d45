"""Tokenizer built from GGUF metadata: round trips, agreement with transformers' own GGUF tokenizer,
chat template rendering, tokenizer.json loading, and the byte-level fallback."""

from __future__ import annotations

import json

import jinja2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jtrail.models.gguf_loader import open_gguf
from jtrail.models.loader import embedded_gguf_path
from jtrail.models.tokenizer import ChatTemplateError, Tokenizer, _bytes_to_unicode

SAMPLES = [
    "Hello, world! The quick brown fox.",
    "digits 0123456789 and 3.14159, 1,000,000",
    "accents: café naïve résumé Ångström über",
    "CJK: 你好，世界。日本語のテキスト 한국어",
    "whitespace:  two  spaces\tTab\n\nnewlines   \r\n trailing  ",
    "emoji 🙂 and symbols ∑∫√ <|not_special|>",
]
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(open_gguf(embedded_gguf_path()))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_digits_split_individually(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5 and [tok.decode([i]) for i in ids] == list("12345")


@pytest.fixture(scope="module")
def ref_tok():
    transformers = pytest.importorskip("transformers")
    path = embedded_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF converter ignores `tokenizer.ggml.pre` ("smollm" here) and pre-tokenizes as
    # GPT-2; SmolLM2's own tokenizer.json (and llama.cpp's "smollm" type) first isolates every numeric
    # character. Give the reference the checkpoint's pre-tokenizer: vocab, merges and special tokens
    # stay transformers' own conversion.
    from tokenizers import pre_tokenizers

    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return ref


def test_matches_transformers_gguf_tokenizer(tok, ref_tok):
    ref = ref_tok
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, text


def test_numeric_characters_stand_alone(tok):
    """Found by Hypothesis: ' ¼' is 'Ġ' + 'Â¼' under the smollm pre-tokenizer (each numeric character
    isolated, as SmolLM2's tokenizer.json and llama.cpp), not GPT-2's 'ĠÂ' + '¼'."""
    assert tok.encode(" ¼") == [tok.token_to_id("Ġ"), tok.token_to_id("Â¼")]
    assert tok.decode(tok.encode(" ¼ Ⅳ ①")) == " ¼ Ⅳ ①"


def test_special_tokens_and_eos(tok):
    assert tok.eos_ids == (2,) and tok.token_to_id("<|im_end|>") == 2
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"  # specials skipped by default
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_equals_direct_jinja2(tok, gen):
    direct = (
        jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        .from_string(tok.chat_template)
        .render(messages=CONV, add_generation_prompt=gen, **tok.special_tokens)
    )
    assert tok.apply_chat_template(CONV, add_generation_prompt=gen) == direct
    if gen:
        assert direct.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_default_system_prompt_chatml(tok):
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert out.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>\n" in out


def test_template_raise_exception_is_typed():
    t = Tokenizer.byte_level()
    t.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    )
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        t.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.byte_level().apply_chat_template([{"role": "user", "content": "x"}])


def test_hf_dir_tokenizer(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
        )
    )
    t2 = Tokenizer.from_hf_dir(tmp_path)
    assert t2.eos_ids == (2,) and t2.bos_id == 1
    for text in SAMPLES:
        assert t2.encode(text) == tok.encode(text)
    assert t2.apply_chat_template(CONV) == tok.apply_chat_template(CONV)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40))
def test_byte_level_round_trip_any_text(text):
    t = Tokenizer.byte_level()
    ids = t.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert t.decode(ids) == text


# SmolLM2's byte-level vocab lacks a few single bytes (some control bytes, lead bytes 0xF1-0xF4 of
# code points >= U+40000): no tokenizer of this checkpoint can round trip those; every other string must.
@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_gguf_round_trip_any_text(tok, text):
    byte_chars = _bytes_to_unicode()
    assume(all(tok.token_to_id(byte_chars[b]) is not None for b in text.encode("utf-8")))
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_gguf_ids_match_transformers_any_text(tok, ref_tok, text):
    assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids


# The engine streams byte-level BPE text a token at a time from `Tokenizer.byte_table`
# (serving/engine/detokenizer.py): the stream must be `decode` of the whole answer, whatever the ids
# (random ids split multi-byte characters anywhere; control tokens are skipped as `decode` skips them).
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 49151 + 64), min_size=1, max_size=40), st.integers(1, 4))  # ids past the
# tokenizer's vocabulary too (a model's padded embedding rows): `decode` skips them, so must the stream
def test_byte_level_stream_is_the_whole_decode(tok, ids, chunk):
    from jtrail.serving.engine.detokenizer import ByteLevelDetokenizer, detokenizer_for

    d = detokenizer_for(tok, [1, 2, 3])
    assert isinstance(d, ByteLevelDetokenizer)
    deltas = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    tail = d.flush()
    assert "".join(deltas) + tail == d.text == tok.decode(ids)
    assert not any(x.endswith("\ufffd") for x in deltas if x) or "\ufffd" in tok.decode(ids)


MIXED = ["日本語 🤖🚀 naïve — “q” 한국어", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("text", SAMPLES + MIXED)
def test_byte_level_stream_of_real_text(tok, text):
    from jtrail.serving.engine.detokenizer import detokenizer_for

    ids = tok.encode(text)
    d = detokenizer_for(tok, [])
    assert "".join(d.add([i]) for i in ids) + d.flush() == tok.decode(ids)


def test_no_byte_table_for_other_decoders(tok, tmp_path):
    """A tokenizer whose decoder is not byte-level (SentencePiece's Metaspace) or that has a non-special
    added token keeps the window detokenizer."""
    from jtrail.serving.engine.detokenizer import IncrementalDetokenizer, detokenizer_for
    from tokenizers import AddedToken, decoders

    tok.backend.save(str(tmp_path / "tokenizer.json"))
    meta = Tokenizer.from_hf_dir(tmp_path)
    meta.backend.decoder = decoders.Metaspace()
    assert meta.byte_table is None and isinstance(detokenizer_for(meta, [5]), IncrementalDetokenizer)
    user = Tokenizer.from_hf_dir(tmp_path)
    user.backend.add_tokens([AddedToken("<my-token>", special=False)])
    assert user.byte_table is None
    assert Tokenizer.from_hf_dir(tmp_path).byte_table == tok.byte_table


def test_byte_level_stream_skips_ids_past_the_vocabulary(tok):
    from jtrail.serving.engine.detokenizer import detokenizer_for

    ids = [*tok.encode("The cat"), tok.vocab_size + 7, *tok.encode(" sat")]
    d = detokenizer_for(tok, [])
    assert "".join(d.add([i]) for i in ids) + d.flush() == tok.decode(ids) == "The cat sat"
