"""The OpenAI API's request and response bodies, as pydantic models.

Requests are strict (a string where a number belongs is an error, never coerced) and
ignore fields they do not know, as OpenAI clients send extras such as `user`. Fields
that would change the output but are not implemented (penalties, tools, ...) are
refused by name rather than silently ignored. `top_k`, `ignore_eos` and `priority`
(lower is admitted sooner, as in vLLM; the openai client sends it in `extra_body`) are
extensions.
Nullable fields mean "the default", as in the OpenAI spec.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from kvmesh.params import MAX_CACHE_SALT, MAX_LOGPROBS, MAX_PRIORITY, MAX_TOP_K

MAX_N = 128
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 256  # each; streaming holds back that many characters
MAX_SEED = 2**63 - 1

# field -> the value that means "not used"; anything else is refused
UNSUPPORTED = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "tools": [],
    "echo": False,
    "suffix": "",
    "best_of": 1,
}


# --- requests ---


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = []
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    priority: int | None = Field(None, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def stop_as_list(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(value) > MAX_STOP:
            raise ValueError(f"stop has {len(value)} strings; at most {MAX_STOP}")
        longest = max(len(s) for s in value) if value else 0
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"stop has a string of {longest} characters; at most {MAX_STOP_CHARS}")
        return value

    @field_validator(*UNSUPPORTED)
    @classmethod
    def refuse_unsupported(cls, value, info):
        if value is not None and value != UNSUPPORTED[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported by kvmesh; leave it out")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    """One turn; content as a string or a list of text parts (joined)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, value):
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in value
        ):
            return "".join(p["text"] for p in value)
        raise ValueError('content must be a string or a list of {"type": "text", "text": ...}')


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions. max_completion_tokens wins over (deprecated) max_tokens."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. prompt: text, list of texts, token ids or list of token-id lists;
    normalized to a list of texts or a list of token-id lists."""

    prompt: list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def prompt_as_batch(cls, value):
        shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError(f"prompt must be a non-empty {shapes}")
        if all(isinstance(p, str) for p in value):
            return value
        if all(is_token_id(t) for t in value):
            return [value]
        if all(isinstance(p, list) and p and all(is_token_id(t) for t in p) for p in value):
            return value
        raise ValueError(f"prompt must be {shapes} (token ids are integers >= 0)")


def is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- responses ---


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """Only the keys that changed: {"role": ..., "content": ...} first, then {"content": ...}."""

    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def drop_none(self, serialize):
        return {key: value for key, value in serialize(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """Both the whole response and (with usage None until the last) a stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "kvmesh"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
