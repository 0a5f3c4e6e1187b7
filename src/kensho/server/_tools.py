"""Structured output and tool calling at the OpenAI boundary.

Inbound, :func:`structured_options` turns ``response_format``, ``tools``,
``tool_choice`` and ``parallel_tool_calls`` into the engine's terms
(:mod:`kensho.runtime.engines.structured`), after checking that every engine behind
the server can *constrain* decoding: a request that asks for JSON or a tool call and
would get prose is refused (400 naming the field), never half-served. A request may
fail over from the primary to the fallback, so both must be able to.
:func:`chat_messages` brings earlier calls (assistant ``tool_calls``) and their
results (``role: "tool"`` with ``tool_call_id``) back into the conversation.

Outbound, :class:`ToolCallParser` reads the model's text as it streams and splits it
into content and calls in the one form the grammar allows (``<tool_call>`` blocks, see
the structured module), and :class:`ToolShaper` shapes them as OpenAI's
``message.tool_calls`` (whole answers) or ``delta.tool_calls`` fragments (streams). Both
paths run the same parser, so a streamed call's fragments reassemble into exactly the
arguments a whole answer would carry. As vLLM does, the arguments stream as they are
generated: the name first, then pieces of the JSON text.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kensho.runtime.engines.base import ChatMessage, GenerationChunk
from kensho.runtime.engines.structured import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    NamedTool,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
    supports_constraints,
)
from kensho.server._errors import APIError
from kensho.server._schemas import ChatCompletionRequest, ChatMessageIn

if TYPE_CHECKING:
    from kensho.runtime.manager import RuntimeManager
    from kensho.server._openai import OpenAIShaper

__all__ = [
    "ParsedAnswer",
    "ToolCallParser",
    "ToolShaper",
    "chat_messages",
    "structured_options",
]

# A call's start, up to its arguments; complete only once the arguments' first character
# is there (a space after the colon could still be coming).
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, code="unsupported_parameter", param=param)


def _require_constraints(runtime: RuntimeManager, param: str) -> None:
    for engine in (runtime.primary, runtime.fallback):
        if engine is not None and not supports_constraints(engine):
            raise _unsupported(
                param,
                f"{param} is not supported by the engines serving this model: engine "
                f"{engine.name!r} cannot constrain decoding, so the answer could not be "
                "guaranteed to follow it",
            )


def _response_format(body: ChatCompletionRequest) -> ResponseFormat | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.json_schema is None:
        return ResponseFormat("json_object")
    return ResponseFormat("json_schema", fmt.json_schema.json_schema, fmt.json_schema.name)


def _tools(body: ChatCompletionRequest) -> tuple[ToolSpec, ...]:
    specs: list[ToolSpec] = []
    for i, tool in enumerate(body.tools or ()):
        function = tool.function
        parameters = function.parameters or {"type": "object", "properties": {}}
        if parameters.get("type", "object") != "object":
            raise APIError(
                400,
                f"tools[{i}].function.parameters must be an object schema "
                f"(type 'object'), got type {parameters.get('type')!r}",
                param=f"tools[{i}].function.parameters",
            )
        if any(spec.name == function.name for spec in specs):
            raise APIError(
                400, f"tools: function {function.name!r} is defined twice", param="tools"
            )
        specs.append(ToolSpec(function.name, function.description or "", parameters))
    return tuple(specs)


def _tool_choice(body: ChatCompletionRequest, tools: Sequence[ToolSpec]) -> ToolChoice:
    choice = body.tool_choice
    if choice is None:
        return "auto" if tools else "none"
    if not tools and choice != "none":
        raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
    if isinstance(choice, str):
        return choice
    name = choice.function.name
    if all(tool.name != name for tool in tools):
        raise APIError(
            400, f"tool_choice names function {name!r}, which is not in tools",
            param="tool_choice",
        )  # fmt: skip
    return NamedTool(name)


def structured_options(body: ChatCompletionRequest, runtime: RuntimeManager) -> dict[str, Any]:
    """The ``GenerationRequest`` fields for ``body``'s structured output and tools.

    Refuses (400, naming the field) what the engines cannot honour, and the
    deprecated ``functions``/``function_call`` with the way to their successors.
    """
    for legacy, successor in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(body, legacy) is not None:
            raise _unsupported(legacy, f"{legacy} is deprecated and not supported: use {successor}")
    if body.parallel_tool_calls is not None and not body.tools:
        raise APIError(
            400, "parallel_tool_calls is only allowed when tools are given",
            param="parallel_tool_calls",
        )  # fmt: skip
    response_format = _response_format(body)
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    if response_format is not None:
        _require_constraints(runtime, "response_format")
    if tools and choice != "none":
        _require_constraints(runtime, "tools")
    return {
        "response_format": response_format,
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
    }


def _message(index: int, message: ChatMessageIn, known_calls: set[str]) -> ChatMessage:
    where = f"messages[{index}]"
    try:
        text = message.text()
    except ValueError as exc:
        raise APIError(400, f"{where}: {exc}", param=f"{where}.content") from None
    calls = tuple(
        ToolCall(call.id, call.function.name, call.function.arguments)
        for call in message.tool_calls or ()
    )
    if calls and message.role != "assistant":
        raise APIError(400, f"{where}: only assistant messages carry tool_calls",
                       param=f"{where}.tool_calls")  # fmt: skip
    if message.role == "tool":
        if message.tool_call_id is None:
            raise APIError(400, f"{where}: a tool message needs tool_call_id",
                           param=f"{where}.tool_call_id")  # fmt: skip
        if message.tool_call_id not in known_calls:
            raise APIError(
                400,
                f"{where}: tool_call_id {message.tool_call_id!r} answers no tool call "
                "of an earlier assistant message",
                param=f"{where}.tool_call_id",
            )
    known_calls.update(call.id for call in calls)
    return ChatMessage(message.role, text, tool_calls=calls, tool_call_id=message.tool_call_id)


def chat_messages(body: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    """``body.messages`` as engine chat turns, tool calls and results included."""
    known_calls: set[str] = set()
    return tuple(_message(i, m, known_calls) for i, m in enumerate(body.messages))


# -- reading calls back out of the model's text -----------------------------------------


@dataclass(frozen=True, slots=True)
class _Content:
    text: str


@dataclass(frozen=True, slots=True)
class _CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class _Arguments:
    index: int
    text: str


ParserEvent = _Content | _CallStart | _Arguments


class _JSONExtent:
    """Finds where one JSON value ends, one character at a time (strings and escapes aware)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False

    def feed(self, char: str) -> bool:
        """Take ``char``; True when it closed the value."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
            return False
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
            self.started = True
        elif char in "}]":
            self.depth -= 1
        return self.started and self.depth == 0


class ToolCallParser:
    """Splits streamed text into content and tool calls (the structured module's form).

    Text that could still become ``<tool_call>`` is held back until it either does or
    cannot; after that, text is content. Inside a call, the name is announced once it
    is complete and the arguments' JSON is passed on as it arrives.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._mode = "undecided"  # -> "content", or "header" -> "arguments" -> "between"
        self._calls = 0
        self._extent = _JSONExtent()

    def feed(self, text: str) -> list[ParserEvent]:
        """What ``text`` (the next piece of the answer) completes."""
        self._buffer += text
        events: list[ParserEvent] = []
        progressed = True
        while self._buffer and progressed:
            progressed = self._step(events)
        return events

    def finish(self) -> list[ParserEvent]:
        """At the end of the answer: whatever is held back is content after all."""
        rest, self._buffer = self._buffer, ""
        return [_Content(rest)] if rest else []

    def _step(self, events: list[ParserEvent]) -> bool:
        """Advance through the buffer in the current mode; False when it must wait."""
        step = {
            "content": self._content,
            "undecided": self._opening,
            "between": self._opening,
            "header": self._header,
            "arguments": self._arguments,
            "closing": self._closing,
        }[self._mode]
        return step(events)

    def _content(self, events: list[ParserEvent]) -> bool:
        events.append(_Content(self._buffer))
        self._buffer = ""
        return False

    def _opening(self, events: list[ParserEvent]) -> bool:
        buffer = self._buffer
        start = buffer.lstrip("\n") if self._mode == "between" else buffer
        if start.startswith(TOOL_CALL_OPEN):
            self._buffer, self._mode = start[len(TOOL_CALL_OPEN) :], "header"
            return True
        if TOOL_CALL_OPEN.startswith(start):
            return False  # could still open a call
        self._mode = "content"
        return True

    def _header(self, events: list[ParserEvent]) -> bool:
        match = _HEADER.match(self._buffer)
        if match is None:
            return False
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        events.append(_CallStart(self._calls, call_id, match.group(1)))
        self._buffer, self._mode = self._buffer[match.end() :], "arguments"
        self._extent = _JSONExtent()
        return True

    def _closing(self, events: list[ParserEvent]) -> bool:
        """After the arguments: the call object's ``}`` and the closing tag."""
        closing = "}" + TOOL_CALL_CLOSE
        if self._buffer.startswith(closing):
            self._buffer, self._mode = self._buffer[len(closing) :], "between"
            self._calls += 1
            return True
        if closing.startswith(self._buffer):
            return False
        self._mode = "content"  # not the form the grammar writes: keep it, as text
        return True

    def _arguments(self, events: list[ParserEvent]) -> bool:
        buffer = self._buffer
        for i, char in enumerate(buffer):
            if self._extent.feed(char):
                events.append(_Arguments(self._calls, buffer[: i + 1]))
                self._buffer, self._mode = buffer[i + 1 :], "closing"
                return True
        events.append(_Arguments(self._calls, buffer))
        self._buffer = ""
        return False


@dataclass
class ParsedAnswer:
    """A whole answer split: its content and its calls (``arguments`` as JSON text)."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def add(self, events: Sequence[ParserEvent]) -> None:
        for event in events:
            if isinstance(event, _Content):
                self.content += event.text
            elif isinstance(event, _CallStart):
                self.calls.append(ToolCall(event.id, event.name, ""))
            else:
                call = self.calls[event.index]
                self.calls[event.index] = dataclasses.replace(
                    call, arguments=call.arguments + event.text
                )

    @classmethod
    def of(cls, text: str) -> ParsedAnswer:
        parser = ToolCallParser()
        parsed = cls()
        parsed.add(parser.feed(text))
        parsed.add(parser.finish())
        return parsed


def _finish(reason: str | None, called: bool) -> str:
    """OpenAI's finish reason: an answer that ended on its calls ends with ``tool_calls``."""
    reason = reason or "stop"
    return "tool_calls" if called and reason == "stop" else reason


def _delta_call(event: _CallStart | _Arguments) -> dict[str, Any]:
    if isinstance(event, _CallStart):
        function = {"name": event.name, "arguments": ""}
        return {"index": event.index, "id": event.id, "type": "function", "function": function}
    return {"index": event.index, "function": {"arguments": event.text}}


class ToolShaper:
    """An :class:`~kensho.server._openai.OpenAIShaper` for chats with tools.

    It wraps the plain shaper (ids, timestamps, content deltas stay its own) and adds
    the tool calls it parses from the text.
    """

    def __init__(self, inner: OpenAIShaper) -> None:
        self.inner = inner
        self._parser = ToolCallParser()
        self._called = False

    def opening(self) -> dict[str, Any]:
        return self.inner.opening()

    @property
    def prompt_tokens(self) -> int:
        return self.inner.prompt_tokens

    def count(self, chunk: GenerationChunk) -> None:
        self.inner.count(chunk)

    def usage_chunk(self, tokens: int, prompt_tokens: int = 0) -> dict[str, Any]:
        return self.inner.usage_chunk(tokens, prompt_tokens)

    def _event(self, chunk: GenerationChunk, event: ParserEvent) -> dict[str, Any]:
        if isinstance(event, _Content):
            return self.inner.delta(dataclasses.replace(chunk, text=event.text, finish_reason=None))
        self._called = True
        shaped = self.inner.delta(dataclasses.replace(chunk, text="", finish_reason=None))
        shaped["choices"][0]["delta"] = {"tool_calls": [_delta_call(event)]}
        return shaped

    def deltas(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """The stream events for one engine chunk: content, call fragments, the end."""
        events = self._parser.feed(chunk.text)
        if chunk.finish_reason is not None:
            events += self._parser.finish()
        shaped = [self._event(chunk, event) for event in events]
        if chunk.finish_reason is not None:
            last = self.inner.delta(dataclasses.replace(chunk, text=""))
            last["choices"][0]["delta"] = {}
            last["choices"][0]["finish_reason"] = _finish(chunk.finish_reason, self._called)
            shaped.append(last)
        return shaped

    def whole(self, chunks: list[GenerationChunk]) -> dict[str, Any]:
        answer = self.inner.whole(chunks)
        parsed = ParsedAnswer.of("".join(c.text for c in chunks))
        if not parsed.calls:
            return answer
        choice = answer["choices"][0]
        choice["message"]["content"] = parsed.content or None
        choice["message"]["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.calls
        ]
        choice["finish_reason"] = _finish(choice["finish_reason"], called=True)
        return answer
