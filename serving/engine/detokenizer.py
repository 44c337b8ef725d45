"""Incremental detokenization (vLLM's prefix/read-offset scheme).

Decoding one token at a time breaks multi-byte characters and word-boundary spaces, so each update
decodes a short window of recent tokens twice and emits only the new suffix; while the window ends in
an incomplete UTF-8 sequence (U+FFFD) nothing is emitted yet.
"""

from __future__ import annotations

from typing import Protocol


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
