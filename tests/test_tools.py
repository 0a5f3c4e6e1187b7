"""Tool calls at the OpenAI boundary: parsing, shaping, and refusing what cannot be honoured.

The real model and the real ``openai`` client are in test_structured_e2e.py; here the
parser and shaper run on exact texts, and the API on fault-injecting engines (which
cannot constrain decoding, so they must refuse).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from kensho.runtime.engines.base import GenerationChunk
from kensho.server._openai import OpenAIShaper
from kensho.server._tools import ParsedAnswer, ToolCallParser, ToolShaper
from test_server_api import CHAT, Stack, make_stack

CALL_A = (
    '<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Pa\\"r}is", "n": [1, {}]}}\n</tool_call>'
)
CALL_B = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
TWO_CALLS = CALL_A + "\n" + CALL_B
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def chunks_of(pieces: list[str], finish: str = "stop") -> list[GenerationChunk]:
    return [
        GenerationChunk(
            text=p, index=i, engine="cpu", finish_reason=finish if i == len(pieces) - 1 else None
        )
        for i, p in enumerate(pieces)
    ]


def streamed(pieces: list[str]) -> ParsedAnswer:
    parser = ToolCallParser()
    parsed = ParsedAnswer()
    for piece in pieces:
        parsed.add(parser.feed(piece))
    parsed.add(parser.finish())
    return parsed


def test_whole_text_splits_into_calls_with_exact_arguments() -> None:
    parsed = ParsedAnswer.of(TWO_CALLS)
    assert parsed.content == ""
    assert [(c.name, c.arguments) for c in parsed.calls] == [
        ("get_weather", '{"city": "Pa\\"r}is", "n": [1, {}]}'),
        ("add", '{"a": 1, "b": 2}'),
    ]
    assert len({c.id for c in parsed.calls}) == 2
    assert all(c.id.startswith("call_") for c in parsed.calls)


def test_calls_streamed_in_any_pieces_reassemble_exactly() -> None:
    whole = ParsedAnswer.of(TWO_CALLS)
    char_by_char = streamed(list(TWO_CALLS))
    assert [(c.name, c.arguments) for c in char_by_char.calls] == [
        (c.name, c.arguments) for c in whole.calls
    ]
    for cut in range(1, len(TWO_CALLS)):
        halves = streamed([TWO_CALLS[:cut], TWO_CALLS[cut:]])
        assert [(c.name, c.arguments) for c in halves.calls] == [
            (c.name, c.arguments) for c in whole.calls
        ], cut
        assert halves.content == ""


@pytest.mark.parametrize("text", ["Sunny.", "<tool call? no", "<tool_cal", ""])
def test_text_that_is_not_a_call_is_content_untouched(text: str) -> None:
    assert streamed(list(text)).content == text
    assert ParsedAnswer.of(text).calls == []


def test_a_call_cut_by_max_tokens_keeps_what_was_generated() -> None:
    parsed = ParsedAnswer.of(CALL_B[: CALL_B.index("2}}")])
    assert [c.name for c in parsed.calls] == ["add"]
    assert parsed.calls[0].arguments == '{"a": 1, "b": '


def test_shaper_whole_answer_is_openai_tool_calls() -> None:
    shape = ToolShaper(OpenAIShaper("chat", "m"))
    answer = shape.whole(chunks_of([CALL_B[:10], CALL_B[10:]]))
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    cut = shape.whole(chunks_of([CALL_B[:-20]], finish="length"))
    assert cut["choices"][0]["finish_reason"] == "length"
    text = shape.whole(chunks_of(["It is ", "sunny."]))
    assert text["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny."}
    assert text["choices"][0]["finish_reason"] == "stop"


def test_shaper_stream_sends_openai_tool_call_deltas() -> None:
    shape = ToolShaper(OpenAIShaper("chat", "m"))
    events = [e for chunk in chunks_of(list(TWO_CALLS)) for e in shape.deltas(chunk)]
    deltas = [e["choices"][0]["delta"] for e in events]
    finishes = [e["choices"][0]["finish_reason"] for e in events]
    assert finishes[-1] == "tool_calls"
    assert set(finishes[:-1]) == {None}
    assert deltas[-1] == {}
    fragments = [d["tool_calls"][0] for d in deltas[:-1]]
    assert all("content" not in d for d in deltas)
    starts = [f for f in fragments if "id" in f]
    assert [(f["index"], f["function"]["name"], f["function"]["arguments"]) for f in starts] == [
        (0, "get_weather", ""),
        (1, "add", ""),
    ]
    arguments = ["".join(f["function"]["arguments"] for f in fragments if f["index"] == i)
                 for i in (0, 1)]  # fmt: skip
    assert arguments == [c.arguments for c in ParsedAnswer.of(TWO_CALLS).calls]
    assert len(fragments) > 10  # arguments stream as they are generated


# -- the API on engines that cannot constrain decoding ---------------------------------


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s, runtime, executor = await make_stack()
    yield s
    await s.client.aclose()
    await executor.aclose()
    await runtime.close()


async def post(stack: Stack, **fields: Any) -> tuple[int, dict[str, Any]]:
    r = await stack.client.post("/v1/chat/completions", json={**CHAT, **fields})
    return r.status_code, r.json()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}},
                }
            },
            "response_format",
        ),
        ({"tools": [WEATHER_TOOL]}, "tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tools"),
    ],
)
async def test_engines_that_cannot_constrain_refuse_with_400(
    stack: Stack, fields: dict[str, Any], param: str
) -> None:
    status, body = await post(stack, **fields)
    assert status == 400
    assert body["error"]["param"] == param
    assert "cannot constrain decoding" in body["error"]["message"]
    assert stack.gpu.stats().calls == stack.cpu.stats().calls == 0


async def test_text_format_and_tool_choice_none_need_no_constraint(stack: Stack) -> None:
    status, body = await post(
        stack, response_format={"type": "text"}, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert "tool_calls" not in body["choices"][0]["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
    ],
)
async def test_inconsistent_tool_fields_are_400_naming_the_field(
    stack: Stack, fields: dict[str, Any], param: str
) -> None:
    status, body = await post(stack, **fields)
    assert status == 400, body
    assert body["error"]["param"] == param


async def test_tool_results_must_answer_an_earlier_call(stack: Stack) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    orphan = [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "42", "tool_call_id": "call_9"},
    ]
    status, body = await post(stack, messages=orphan)
    assert status == 400
    assert body["error"]["param"] == "messages[1].tool_call_id"
    missing = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    status, body = await post(stack, messages=missing)
    assert body["error"]["param"] == "messages[1].tool_call_id"
    answered = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    status, body = await post(stack, messages=answered)
    assert status == 200
    assert body["choices"][0]["message"]["content"]
