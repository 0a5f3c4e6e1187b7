"""Schemas and tools shared by the constraint tests of both engines (torch, llama)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.structured import ToolCall, ToolSpec
from kensho.server._tools import ParsedAnswer

__all__ = ["ADD", "PERSON", "TOOLS", "WEATHER", "ask", "check_calls"]

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"enum": ["C", "F"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
ADD = ToolSpec(
    "add",
    "Add two integers",
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -99, "maximum": 99},
            "b": {"type": "integer", "minimum": -99, "maximum": 99},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
)
TOOLS = (WEATHER, ADD)


def ask(**kwargs: Any) -> GenerationRequest:
    options: dict[str, Any] = {"max_tokens": 150, "temperature": 1.0, **kwargs}
    return GenerationRequest.chat([("user", "Tell me about it.")], **options)


def check_calls(text: str, allowed: tuple[ToolSpec, ...]) -> list[ToolCall]:
    """Every call in ``text`` names an allowed tool and its arguments fit its schema."""
    parsed = ParsedAnswer.of(text)
    assert parsed.content == ""
    assert parsed.calls
    by_name = {tool.name: tool for tool in allowed}
    for call in parsed.calls:
        jsonschema.validate(json.loads(call.arguments), dict(by_name[call.name].parameters))
    return parsed.calls
