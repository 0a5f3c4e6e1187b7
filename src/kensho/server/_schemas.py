"""OpenAI-compatible request bodies, validated with pydantic.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do: clients
send options (``logprobs``, ``user``, ``stream_options`` ...) that a local model may
not support, and refusing them would break the official client for nothing. Fields we
do read are strictly typed and bounded; values we cannot honour (``n > 1``) are
refused with a clear 400 rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BreakerAction",
    "ChatCompletionRequest",
    "ChatMessageIn",
    "CompletionRequest",
    "ContentPart",
    "StreamOptions",
]

MAX_TOKENS_LIMIT = 32_768


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Loose):
    """A part of a message's content; only text parts are understood."""

    type: str
    text: str | None = None


class ChatMessageIn(_Loose):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        unsupported = sorted({p.type for p in self.content if p.type != "text"})
        if unsupported:
            raise ValueError(f"message content of type {', '.join(unsupported)} is not supported")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(_Loose):
    include_usage: bool = False


class _Sampling(_Loose):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: (
        Annotated[str, Field(min_length=1, max_length=256)]
        | list[Annotated[str, Field(min_length=1, max_length=256)]]
        | None
    ) = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1024)
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (a single prompt)."""

    prompt: str | list[str]
    echo: bool = False

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return self.prompt[0]


class BreakerAction(BaseModel):
    """``POST /v1/kensho/breaker``: operate a breaker or inject primary failures."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["force_open", "reset", "fail_primary", "heal_primary"]
    engine: Literal["primary", "fallback"] = "primary"
    times: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
