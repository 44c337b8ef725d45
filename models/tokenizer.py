"""Tokenizer (pip `tokenizers`) built from GGUF metadata, a `tokenizer.json`, or raw bytes, plus the
checkpoint's own chat template rendered with a sandboxed jinja2 environment (as transformers does)."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import CorruptCheckpointError, JtrailError, UnknownModelError

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# Llama-3's pre-tokenizer split pattern (tokenizer.ggml.pre == "llama-bpe").
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ChatTemplateError(JtrailError, ValueError):
    """The chat template raised (e.g. roles not alternating) or is missing."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


@dataclass
class Tokenizer:
    """Thin wrapper: encode/decode ids and render the chat template."""

    backend: HFTokenizer
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    add_bos: bool = False
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token strings for templates

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`. `special=True` turns control-token strings (`<|im_start|>`) in the
        text into control tokens (for trusted text, such as a rendered chat template); with
        `special=False` they stay plain text, as client text must (see `encode_chat`)."""
        backend = self.backend if special else self._text_backend
        # add_special_tokens=False: no post-processor template; BOS is added here, by `add_bos`.
        ids = backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    @cached_property
    def byte_table(self) -> tuple[bytes, ...] | None:
        """Each id's bytes when decoding is byte-level BPE, as `decode` does it (special tokens skipped:
        b""): a sequence's text is then its tokens' bytes concatenated, read as UTF-8, so a stream can
        be detokenized a token at a time without re-decoding a window (serving/engine/detokenizer.py).
        None for any other decoder, or when an added token is not special (its text bypasses the
        byte map)."""
        if type(self.backend.decoder) is not decoders.ByteLevel:
            return None
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        added = self.backend.get_added_tokens_decoder()
        if any(not t.special for t in added.values()):
            return None
        table: list[bytes] = [b""] * self.backend.get_vocab_size(with_added_tokens=True)
        for token, i in self.backend.get_vocab(with_added_tokens=False).items():
            if i in added:
                continue
            try:
                table[i] = bytes(inverse[c] for c in token)
            except KeyError:  # not a byte-level vocabulary after all
                return None
        return tuple(table)

    @cached_property
    def _text_backend(self) -> HFTokenizer:
        """A copy of the backend that never matches special (control) tokens in the input: `tokenizers`
        matches added tokens even with add_special_tokens=False; `encode_special_tokens` turns that off
        for the special ones. A copy, because the flag is per object and encoding runs on several
        threads at once."""
        backend = HFTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def encode_chat(self, messages: Sequence[dict[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Render the chat template and tokenize it so that only the template emits control tokens:
        message content is tokenized as plain text (a `<|im_start|>` typed by a client stays text).

        Content is wrapped in per-call random markers while rendering; the rendered text is split at
        the markers and each piece tokenized as template (control tokens on) or content (off). The
        template carries its own BOS."""
        nonce = secrets.token_hex(8)
        start, end = f"\ue000{nonce}\ue000", f"\ue001{nonce}\ue001"
        wrapped = [{**m, "content": f"{start}{m['content']}{end}"} for m in messages]
        rendered = self.apply_chat_template(wrapped, add_generation_prompt)
        ids: list[int] = []
        inside = False
        for piece in re.split(f"({re.escape(start)}|{re.escape(end)})", rendered):
            if piece == start or piece == end:
                inside = piece == start
            elif piece:
                ids += self.encode(piece, add_bos=False, special=not inside)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @cached_property
    def _template(self):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ChatTemplateError("this checkpoint has no chat template; use generate() with plain prompts")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ([{"role", "content"}]) with the checkpoint's template."""
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        from .gguf_loader import field_value

        kind = field_value(reader, "tokenizer.ggml.model")
        if kind != "gpt2":  # byte-level BPE: Llama 3, SmolLM2, Qwen2, ...
            raise UnknownModelError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')"
            )
        tokens = list(field_value(reader, "tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
        types = list(field_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=False))
        pre = field_value(reader, "tokenizer.ggml.pre") or "default"
        if pre in ("llama-bpe", "llama3", "smaug-bpe"):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        elif pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _USER_DEFINED
        ]
        tok.add_special_tokens(specials)
        if user:
            tok.add_tokens(user)
        bos = field_value(reader, "tokenizer.ggml.bos_token_id")
        eos = field_value(reader, "tokenizer.ggml.eos_token_id")
        eot = field_value(reader, "tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
        st = {}
        if bos is not None:
            st["bos_token"] = tokens[int(bos)]
        if eos is not None:
            st["eos_token"] = tokens[int(eos)]
        return cls(
            tok,
            None if bos is None else int(bos),
            eos_ids,
            field_value(reader, "tokenizer.chat_template"),
            bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
            st,
        )

    @classmethod
    def from_hf_dir(
        cls, path: str | Path, bos_id: int | None = None, eos_ids: tuple[int, ...] = ()
    ) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise CorruptCheckpointError(f"{path} has no tokenizer.json")
        tok = HFTokenizer.from_file(str(tj))
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        st = {}
        for key in ("bos_token", "eos_token"):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if v is not None:
                st[key] = v
        if bos_id is None and "bos_token" in st:
            bos_id = tok.token_to_id(st["bos_token"])
        if "eos_token" in st and tok.token_to_id(st["eos_token"]) is not None:
            eos_ids = tuple(dict.fromkeys([*eos_ids, tok.token_to_id(st["eos_token"])]))
        return cls(tok, bos_id, tuple(eos_ids), template, bool(cfg.get("add_bos_token", False)), st)

    @classmethod
    def byte_level(cls, eos_ids: tuple[int, ...] = ()) -> Tokenizer:
        """256 tokens, id == byte value: the tokenizer for random-init named shapes."""
        alphabet = _bytes_to_unicode()
        tok = HFTokenizer(models.BPE({alphabet[b]: b for b in range(256)}, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok, None, eos_ids, None)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (used by ByteLevel)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}
