"""Structured output and tool calling: what a request asks for, engine-agnostic.

A :class:`~kensho.runtime.engines.base.GenerationRequest` may carry a
:class:`ResponseFormat` (JSON mode or a JSON schema) and :class:`ToolSpec` s with a
tool choice. An engine that can *constrain* decoding to them declares
``"constraints"`` in its ``features`` (see :func:`supports_constraints`); any other engine
must refuse such a request, never ignore it — an application asking for JSON that
gets prose breaks silently.

A tool call is written in the model's output in one fixed text form, the one
Hermes/Qwen-style chat templates teach (and which the server parses back into
OpenAI ``tool_calls``)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Parallel calls follow each other, separated by one newline. Keeping the form here, in
one place, lets every engine's grammar and the server's parser agree on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kensho.runtime.engines.base import ChatMessage

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_CALL_SEPARATOR",
    "NamedTool",
    "ResponseFormat",
    "ToolCall",
    "ToolChoice",
    "ToolSpec",
    "supports_constraints",
    "template_messages",
    "tool_call_prefix",
]

TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
TOOL_CALL_SEPARATOR = "\n"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """``response_format``: any JSON object (``json_object``) or one ``schema``."""

    type: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any] | None = field(default=None, hash=False)
    name: str = "response"

    def __post_init__(self) -> None:
        if (self.type == "json_schema") != (self.schema is not None):
            raise ValueError("a json_schema response format needs a schema (and only it)")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call; ``parameters`` is its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}, hash=False
    )

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry, the shape chat templates expect for ``tools=``."""
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class NamedTool:
    """``tool_choice`` naming one function: the model must call exactly that one."""

    name: str


ToolChoice = Literal["auto", "none", "required"] | NamedTool


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made (or made earlier in the conversation): ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str

    def to_template(self) -> dict[str, Any]:
        """The shape chat templates read (``arguments`` as an object when it is one)."""
        try:
            arguments: Any = json.loads(self.arguments)
        except ValueError:
            arguments = self.arguments
        function = {"name": self.name, "arguments": arguments}
        return {"id": self.id, "type": "function", "function": function}


def tool_call_prefix(name: str) -> str:
    """The exact text of a call to ``name`` up to its arguments object.

    ``json.dumps`` spacing, like the examples chat templates render, keeps a constrained
    call in the form the model has seen.
    """
    return TOOL_CALL_OPEN + '{"name": ' + json.dumps(name) + ', "arguments": '


def supports_constraints(engine: object) -> bool:
    """Whether ``engine`` declares it can constrain decoding (JSON schemas, tool calls):
    ``"constraints"`` in its ``features`` set; an engine that declares nothing cannot.
    """
    return "constraints" in getattr(engine, "features", ())


def template_messages(messages: Iterable[ChatMessage]) -> list[dict[str, Any]]:
    """Chat turns as the dicts Hugging Face chat templates read.

    ``developer`` (OpenAI's newer name) becomes ``system``, which templates know; an
    assistant turn's calls go in ``tool_calls`` and a tool result keeps its
    ``tool_call_id``, the names transformers documents for tool use.
    """
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        turn: dict[str, Any] = {"role": role, "content": message.content}
        if message.tool_calls:
            turn["tool_calls"] = [call.to_template() for call in message.tool_calls]
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        turns.append(turn)
    return turns
