"""OpenAI-compatible request bodies, validated with pydantic.

Every field of OpenAI's chat and completions schemas is declared here, strictly typed
and bounded, and nothing is silently ignored: what the server cannot honour is refused
with a 400 naming the field (the audit in ``_fields.py``, which also knows which
fields need an engine feature), and a field OpenAI does not know either is refused as
OpenAI refuses it ("Unrecognized request argument supplied"). That is why the request
models keep their extra fields (``extra="allow"``): to name them, never to use them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kensho.runtime.engines.base import MAX_TOP_LOGPROBS

__all__ = [
    "BreakerAction",
    "ChatCompletionRequest",
    "ChatMessageIn",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingRequest",
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
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions ``logprobs``
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on one /v1/embeddings call
Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
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
    include_obfuscation: bool | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept to be refused by name (module doc)

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
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: Annotated[str, Field(max_length=512)] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        bad = [k for k in value if not k.isascii() or not k.isdigit()]
        if bad:
            raise ValueError(f"keys must be token ids (integers as strings), got {bad[0]!r}")
        return value

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs, in token order."""
        return tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items()))

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
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Declared to be refused with a reason when set (``_fields.py``): a local text model
    # has no audio, no web search, no stored completions, no reasoning budget.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: Annotated[str, Field(max_length=512)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=512)] | None = None
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

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    suffix: str | None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if not all(isinstance(p, str) for p in self.prompt):
            raise ValueError("prompts as token ids are not supported here: send the text")
        if len(self.prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return str(self.prompt[0])


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: text, texts, token ids or lists of token ids."""

    model_config = ConfigDict(extra="allow")  # kept to be refused by name (module doc)

    model: str = Field(min_length=1, max_length=256)
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=512)] | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return value

    def inputs(self) -> list[str | tuple[int, ...]]:
        """One entry per vector to return, in order."""
        value = self.input
        if isinstance(value, str):
            return [value]
        out: list[str | tuple[int, ...]] = []
        ids: list[int] = []
        for item in value:
            if isinstance(item, int):
                ids.append(item)  # one input given as token ids
            else:
                out.append(item if isinstance(item, str) else tuple(item))
        return [tuple(ids)] if ids else out


class BreakerAction(BaseModel):
    """``POST /v1/kensho/breaker``: operate a breaker or inject primary failures."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["force_open", "reset", "fail_primary", "heal_primary"]
    engine: Literal["primary", "fallback"] = "primary"
    times: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
