"""Structured output and tools end to end: the official ``openai`` client against ``kensho up``.

The served model is the tiny demo model, which has never seen JSON or a tool call:
whatever it answers is valid because decoding is constrained token by token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from _server_support import Server, kensho_env, kensho_up

pytestmark = pytest.mark.slow

DEMO = "kensho-demo"
ASK = [{"role": "user", "content": "Tell me about it."}]
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD_PARAMS = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "add", "parameters": ADD_PARAMS}},
]
PARAMS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}


class Address(BaseModel):
    city: str = Field(max_length=6)
    zip: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]
    tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=2)
    address: Address


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("structured")
    with kensho_up(env=kensho_env(home), cwd=home) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parse_with_a_pydantic_model_at_temperature_1(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.parse(
        model=DEMO,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Person,
        temperature=1,
        seed=seed,
        max_tokens=150,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)  # parsed *and* validated by pydantic


def test_json_mode_answers_a_json_object(client: openai.OpenAI) -> None:
    for seed in (4, 5):
        reply = client.chat.completions.create(
            model=DEMO,
            messages=ASK,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
            seed=seed,
            max_tokens=60,
        )
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_a_schema_keyword_that_cannot_be_enforced_is_a_400_naming_it(
    client: openai.OpenAI,
) -> None:
    schema = {"type": "object", "not": {"required": ["a"]}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=DEMO,
            messages=ASK,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    body: Any = refused.value.body
    assert body["param"] == "response_format"
    assert "not" in body["message"]


def test_required_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=DEMO,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        seed=3,
        max_tokens=120,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    # The call and its result go back into the conversation; the model answers in text.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(
        model=DEMO, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=20
    )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as orphan:
        client.chat.completions.create(
            model=DEMO,
            messages=[messages[0], {"role": "tool", "tool_call_id": "call_x", "content": "?"}],
        )
    assert orphan.value.param == "messages[1].tool_call_id"  # type: ignore[attr-defined]


def test_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEMO,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False,
        seed=1,
        max_tokens=120,
    )
    [call] = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD_PARAMS)


def test_streamed_tool_call_deltas_reassemble_exactly(client: openai.OpenAI) -> None:
    options: dict[str, Any] = {
        "model": DEMO,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "seed": 2,
        "max_tokens": 120,
    }
    whole = client.chat.completions.create(**options)
    [expected] = whole.choices[0].message.tool_calls or []
    calls: dict[int, dict[str, str]] = {}
    fragments = 0
    finish = None
    for chunk in client.chat.completions.create(stream=True, **options):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or ():
            fragments += 1
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            assert delta.function is not None
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert fragments > 3  # the arguments came in pieces
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (
        expected.function.name,
        expected.function.arguments,
    )
