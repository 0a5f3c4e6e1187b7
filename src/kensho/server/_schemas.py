"""OpenAI-compatible request bodies, validated with pydantic.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do: clients
send options (``logprobs``, ``user``, ``stream_options`` ...) that a local model may
not support, and refusing them would break the official client for nothing. Fields we
do read are strictly typed and bounded; values we cannot honour (``n > 1``) are
refused with a clear 400 rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "BreakerAction",
    "ChatCompletionRequest",
    "ChatMessageIn",
    "CompletionRequest",
    "ContentPart",
    "FunctionCallIn",
    "FunctionIn",
    "JSONSchemaFormat",
    "ResponseFormatIn",
    "StreamOptions",
    "ToolCallIn",
    "ToolChoiceIn",
    "ToolIn",
]

MAX_TOKENS_LIMIT = 32_768
MAX_TOOLS = 128  # OpenAI's limit on ``tools``
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Loose):
    """A part of a message's content; only text parts are understood."""

    type: str
    text: str | None = None


class FunctionCallIn(_Loose):
    """The function an earlier assistant turn called; ``arguments`` is JSON text."""

    name: FunctionName
    arguments: Annotated[str, Field(max_length=1 << 20)]


class ToolCallIn(_Loose):
    """One call in an assistant message's ``tool_calls``."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Loose):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None

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


class JSONSchemaFormat(_Loose):
    """``response_format.json_schema``: the schema the answer must validate against."""

    name: FunctionName = "response"
    description: str | None = None
    # ``schema`` would shadow a BaseModel method: the alias keeps OpenAI's name.
    json_schema: dict[str, Any] = Field(alias="schema", default_factory=dict)
    strict: bool | None = None


class ResponseFormatIn(_Loose):
    """``response_format``: free text, any JSON object, or JSON that fits a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormatIn:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class FunctionIn(_Loose):
    """A function the model may call; ``parameters`` is its arguments' JSON schema."""

    name: FunctionName
    description: Annotated[str, Field(max_length=8192)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Loose):
    type: Literal["function"]
    function: FunctionIn


class _FunctionRef(_Loose):
    name: FunctionName


class ToolChoiceIn(_Loose):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: _FunctionRef


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1024)
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    # Structured output and tools (``_tools.py`` turns them into the engine's terms).
    response_format: ResponseFormatIn | None = None
    tools: Annotated[list[ToolIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None
    # The deprecated forms of tools: refused with the way to the current ones.
    functions: list[Any] | None = None
    function_call: Any = None


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
