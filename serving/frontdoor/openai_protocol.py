"""Request and response shapes of jtrail's OpenAI-compatible HTTP API (pydantic models).

vLLM's OpenAI server is the reference for what is accepted: OpenAI's fields plus vLLM's sampling
extensions `top_k`, `ignore_eos`, `min_tokens` and `priority`. Unknown fields are ignored (as vLLM and
OpenAI do), so clients and load tools that send more than jtrail needs still work; fields that would
change the answer and that jtrail cannot honour (`logprobs`, `n > 1`, penalties, `echo`, `min_tokens`)
are refused with 400 naming the field, never silently dropped.

jtrail's additions:
- `timeout` (request body, seconds): a server-side deadline; past it the request is cancelled and the
  client gets 504 (or, once a stream has started, an error event).
- `remaining_estimate` on every streamed chunk: the engine's current estimate of the tokens this
  request still has to generate (the TRAIL probe's refined prediction), `null` when the server runs
  without a probe. The final non-streamed response carries the last estimate too.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NonNegInt = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the one model this server serves
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = None  # vLLM: -1 or 0 mean "no cut"
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    priority: int = 0  # lower runs first (vLLM's convention)
    stop_token_ids: list[NonNegInt] | None = None
    # jtrail's extension
    timeout: Annotated[float, Field(gt=0.0)] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first requested feature jtrail cannot honour, else None."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.min_tokens:
            return "min_tokens", "not supported by this engine (only 0)"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, "penalties are not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "only allowed with stream=true"
        return None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class CompletionRequest(_Request):
    # One prompt per request: text or token ids (vLLM also takes batches; jtrail's engine API is one
    # stream per request, so batches are refused with a clear 400 rather than half-served).
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs is not None:
            return "logprobs", "log probabilities are not supported"
        if self.echo:
            return "echo", "not supported"
        if self.suffix:
            return "suffix", "not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_length_limit(self) -> ChatCompletionRequest:
        # OpenAI deprecated max_tokens for max_completion_tokens; both mean the same cap here.
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send one")
            self.max_tokens = self.max_completion_tokens
        return self

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs:
            return ("logprobs" if self.logprobs else "top_logprobs"), "log probabilities are not supported"
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only type 'text' is supported"
        return super().unsupported()


# ---- responses ---------------------------------------------------------------------------------

FinishReasonName = Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReasonName = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    remaining_estimate: float | None = None  # jtrail extension (see the module docstring)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReasonName = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    remaining_estimate: float | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReasonName = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    remaining_estimate: float | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    remaining_estimate: float | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jtrail"
    max_model_len: int
    # jtrail's additions: how this server schedules
    policy: str
    probe: str | None = None
    num_slots: int
    max_queue: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
