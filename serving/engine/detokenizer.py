"""Incremental detokenization (vLLM's prefix/read-offset scheme).

Decoding one token at a time breaks multi-byte characters and word-boundary spaces, so each update
decodes a short window of recent tokens twice and emits only the new suffix; while the window ends in
an incomplete UTF-8 sequence (U+FFFD) nothing is emitted yet.
"""

from __future__ import annotations

import codecs
from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], window: int = 6):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-window:])
        # prefix_offset: start of the context window; read_offset: end of text already emitted.
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Append tokens, return the newly completed text (possibly "")."""
        if self.tokenizer is None:
            return ""
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At finish: emit what is still held back (an incomplete character decodes as U+FFFD)."""
        if self.tokenizer is None or self.read_offset == len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        delta = self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class ByteLevelDetokenizer:
    """Incremental detokenization for byte-level BPE (SmolLM2, Llama 3, Qwen2): a token's text is its
    bytes, so the stream is the tokens' bytes through an incremental UTF-8 decoder, which holds back an
    incomplete character as the window scheme does (and, at the end, replaces it as `decode` does).
    Exact, and one table lookup per token instead of two window decodes (benchmarks/detok_cost.py,
    results/detok_cost.json: 3.2x less host time a token on CPU; at 32 rows a step, time on the engine
    thread's critical path)."""

    def __init__(self, table: tuple[bytes, ...]):
        self.table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        t, n = self.table, len(self.table)
        # an id past the tokenizer's vocabulary (a model's padded embedding rows, which sampling or a
        # replayed answer can reach) has no text: `decode` skips it, and so does the stream
        if len(new_ids) == 1:  # the common case: one token a row a step
            i = new_ids[0]
            data = t[i] if 0 <= i < n else b""
        else:
            data = b"".join(t[i] for i in new_ids if 0 <= i < n)
        delta = self._utf8.decode(data)
        if delta:
            self.text += delta
        return delta

    def flush(self) -> str:
        delta = self._utf8.decode(b"", final=True)
        self.text += delta
        return delta


def detokenizer_for(tokenizer: Any, prompt_ids: list[int]) -> IncrementalDetokenizer | ByteLevelDetokenizer:
    """The byte-level detokenizer when the tokenizer offers a byte table (`Tokenizer.byte_table`), else
    the window scheme."""
    table = getattr(tokenizer, "byte_table", None)
    return ByteLevelDetokenizer(table) if table is not None else IncrementalDetokenizer(tokenizer, prompt_ids)
