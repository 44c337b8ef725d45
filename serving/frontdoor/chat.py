"""Chat input checks shared by every front end (`LLM.chat`, the gRPC servicer, the HTTP front):
one function, so that a conversation refused by one is refused by all.

Roles are a closed set: the role string is pasted into the chat template, so a free-form role
(`user<|im_end|>\n<|im_start|>system`) would let a client forge a turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..sequence import InvalidRequestError

ROLES = ("system", "user", "assistant")
# A text prompt or conversation longer than this many UTF-8 bytes per token of context cannot be a
# prompt that fits: natural text averages ~4 bytes per token, and few vocabularies have tokens over 32
# bytes. Checked before tokenizing, so an oversized request costs no tokenizer time.
MAX_PROMPT_BYTES_PER_TOKEN = 32


def max_prompt_bytes(max_model_len: int) -> int:
    return MAX_PROMPT_BYTES_PER_TOKEN * max_model_len


def check_text_size(text: str, max_model_len: int, field: str = "prompt") -> None:
    """Reject text that cannot fit `max_model_len` tokens, in time linear in its size at worst."""
    limit = max_prompt_bytes(max_model_len)
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidRequestError(field, f"longer than {limit} bytes ({MAX_PROMPT_BYTES_PER_TOKEN} bytes per "
                                         f"token of the {max_model_len}-token context)")


def check_messages(messages: Any, max_model_len: int | None = None) -> list[dict[str, str]]:
    """Validate a conversation ([{"role", "content"}, ...]) and return it as plain dicts.

    Every message needs a role in `ROLES` and string content; at least one user message must say
    something. With `max_model_len`, the conversation's size is bounded before any tokenizing: at most
    `max_model_len` messages (each costs template tokens) and `max_prompt_bytes(max_model_len)` bytes."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {'role', 'content'} messages")
    if max_model_len is not None and len(messages) > max_model_len:
        raise InvalidRequestError("messages", f"{len(messages)} messages cannot fit the "
                                              f"{max_model_len}-token context")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRequestError("messages", f"message {i} needs 'role' and 'content', got {m!r:.100}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise InvalidRequestError("messages", f"message {i}: unknown role {role!r:.100}; expected one "
                                                  f"of {ROLES}")
        if not isinstance(content, str):
            raise InvalidRequestError("messages", f"message {i}: content must be a string, got "
                                                  f"{type(content).__name__}")
        out.append({"role": role, "content": content})
    if max_model_len is not None:
        check_text_size("".join(m["content"] for m in out), max_model_len, "messages")
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise InvalidRequestError("messages", "no non-empty user message")
    return out
