"""Constrained decoding (llguidance) on the real demo model: schemas, JSON mode, tool calls."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llguidance.hf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher
from transformers import AutoTokenizer

from _chunk_support import collect, text_of
from _schema_support import ADD, PERSON, TOOLS, WEATHER, ask, check_calls
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import InvalidRequestError
from kensho.runtime.engines._constraints import grammar_for
from kensho.runtime.engines.base import ChatMessage, GenerationRequest
from kensho.runtime.engines.faulty import MockCPUEngine
from kensho.runtime.engines.structured import (
    NamedTool,
    ResponseFormat,
    ToolCall,
    ToolSpec,
    supports_constraints,
)
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.server._tools import ParsedAnswer


@pytest.fixture(scope="module")
def engine() -> Iterator[TorchEngine]:
    eng = TorchEngine(DEMO_MODEL_DIR, device="cpu")
    asyncio.run(eng.load())
    yield eng
    asyncio.run(eng.close())


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_schema_output_parses_and_validates_at_temperature_1(
    engine: TorchEngine, seed: int
) -> None:
    fmt = ResponseFormat("json_schema", PERSON)
    chunks = await collect(engine, ask(response_format=fmt, seed=seed))
    assert chunks[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(chunks)), PERSON)


async def test_concurrent_requests_with_one_schema_keep_their_own_grammar_state(
    engine: TorchEngine,
) -> None:
    # Compiled grammars are cached per schema: each request must get its own copy.
    fmt = ResponseFormat("json_schema", PERSON)
    answers = await asyncio.gather(
        *(collect(engine, ask(response_format=fmt, seed=seed)) for seed in (7, 8, 9))
    )
    assert len({text_of(chunks) for chunks in answers}) == 3
    for chunks in answers:
        assert chunks[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(chunks)), PERSON)


async def test_json_mode_answers_that_finish_are_json_objects(engine: TorchEngine) -> None:
    finished = 0
    for seed in (0, 4, 5):
        request = ask(response_format=ResponseFormat("json_object"), seed=seed, max_tokens=60)
        chunks = await collect(engine, request)
        if chunks[-1].finish_reason == "stop":
            assert isinstance(json.loads(text_of(chunks)), dict)
            finished += 1
        else:  # cut at max_tokens, as OpenAI's JSON mode may be
            assert chunks[-1].finish_reason == "length"
            assert text_of(chunks).startswith("{")
    assert finished >= 1


async def test_a_complete_grammar_ends_with_stop_and_a_cut_with_length(
    engine: TorchEngine,
) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"const": "yes"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = ResponseFormat("json_schema", schema)
    whole = await collect(engine, ask(response_format=fmt, seed=0))
    assert text_of(whole) == '{"answer": "yes"}'
    assert whole[-1].finish_reason == "stop"
    # The stream ends on the grammar's last token, without sampling one more.
    assert len(whole) == len(engine._tokenizer.encode('{"answer": "yes"}'))
    cut = await collect(engine, ask(response_format=fmt, seed=0, max_tokens=3))
    assert cut[-1].finish_reason == "length"
    assert '{"answer": "yes"}'.startswith(text_of(cut))


async def test_a_keyword_the_engine_cannot_enforce_is_refused_by_name(
    engine: TorchEngine,
) -> None:
    unenforceable = {"type": "object", "not": {"required": ["a"]}}
    for _ in range(2):  # a refused schema is not cached as if it were good
        with pytest.raises(InvalidRequestError, match="not") as fmt_error:
            fmt = ResponseFormat("json_schema", unenforceable)
            await collect(engine, ask(response_format=fmt))
        assert fmt_error.value.param == "response_format"
    tools = (WEATHER, ToolSpec("bad", "", unenforceable))
    with pytest.raises(InvalidRequestError, match="not") as tool_error:
        await collect(engine, ask(tools=tools, tool_choice="required"))
    assert tool_error.value.param == "tools[1].function.parameters"


@pytest.mark.parametrize("seed", [0, 1])
async def test_required_tool_choice_makes_valid_calls(engine: TorchEngine, seed: int) -> None:
    chunks = await collect(engine, ask(tools=TOOLS, tool_choice="required", seed=seed))
    if chunks[-1].finish_reason == "stop":
        check_calls(text_of(chunks), TOOLS)
    else:  # parallel calls may run to max_tokens: every finished call is still valid
        assert chunks[-1].finish_reason == "length"
        finished = text_of(chunks).rsplit("\n<tool_call>", 1)[0]
        check_calls(finished, TOOLS)


async def test_named_tool_without_parallel_calls_makes_exactly_that_call(
    engine: TorchEngine,
) -> None:
    for seed in range(2):
        request = ask(
            tools=TOOLS, tool_choice=NamedTool("add"), parallel_tool_calls=False, seed=seed
        )
        chunks = await collect(engine, request)
        assert chunks[-1].finish_reason == "stop"
        calls = check_calls(text_of(chunks), (ADD,))
        assert [call.name for call in calls] == ["add"]


def test_auto_lets_the_model_answer_in_text_or_call() -> None:
    grammar = grammar_for(ask(tools=TOOLS, tool_choice="auto"))
    assert grammar is not None
    hf = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    tokenizer = llguidance.hf.from_tokenizer(hf)

    def accepts(text: str) -> bool:
        matcher = LLMatcher(tokenizer, LLMatcher.grammar_from_lark(grammar), log_level=0)
        tokens = tokenizer.tokenize_str(text)
        return matcher.validate_tokens(tokens) == len(tokens) and (
            matcher.consume_tokens(tokens) and matcher.is_accepting()
        )

    assert accepts("It is sunny in Paris.")
    assert accepts("<tool call, not quite")
    assert accepts('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>')
    assert not accepts("<tool_call>\nsome prose")


async def test_a_continued_constrained_stream_still_validates(engine: TorchEngine) -> None:
    request = ask(response_format=ResponseFormat("json_schema", PERSON), seed=5)
    first = await collect(engine, request)
    head = first[:12]
    rest = await collect(engine, request.continued(text_of(head), len(head)))
    assert rest[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(head) + text_of(rest)), PERSON)


def test_tools_and_tool_turns_reach_the_chat_template(engine: TorchEngine) -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "C"}')
    request = GenerationRequest(
        messages=(
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "sunny, 21 C", tool_call_id="call_1"),
        ),
        tools=TOOLS,
    )
    prompt = engine.prompt_text(request)
    assert prompt.startswith("Tools: get_weather, add\n")
    assert (
        'Assistant: <tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "C"}}\n</tool_call><|endoftext|>\nTool: sunny, 21 C\n'
    ) in prompt
    assert prompt.endswith("Assistant:")


async def test_a_template_without_tools_is_refused_not_ignored(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}", encoding="utf-8"
    )
    eng = TorchEngine(model_dir)
    await eng.load()
    try:
        with pytest.raises(InvalidRequestError, match="does not render tools") as refused:
            await collect(eng, ask(tools=TOOLS, tool_choice="required"))
        assert refused.value.param == "tools"
    finally:
        await eng.close()


async def test_an_engine_without_constraints_refuses_them() -> None:
    mock = MockCPUEngine(time_to_first_token=0, time_per_token=0)
    await mock.load()
    assert not supports_constraints(mock)
    assert supports_constraints(TorchEngine(DEMO_MODEL_DIR))
    with pytest.raises(InvalidRequestError) as refused:
        await collect(mock, ask(response_format=ResponseFormat("json_object")))
    assert refused.value.param == "response_format"
    # tool_choice "none" asks for no constraint: served as plain text.
    plain = await collect(mock, ask(tools=TOOLS, tool_choice="none", max_tokens=3))
    assert len(plain) == 3


@pytest.mark.parametrize("seed", [0, 1])
async def test_auto_answers_are_text_or_valid_calls(engine: TorchEngine, seed: int) -> None:
    chunks = await collect(engine, ask(tools=TOOLS, tool_choice="auto", seed=seed, max_tokens=80))
    text = text_of(chunks)
    parsed = ParsedAnswer.of(text)
    if parsed.calls and chunks[-1].finish_reason == "stop":
        check_calls(text, TOOLS)
    else:
        assert not text.startswith("<tool_call>")
        assert parsed.content == text


_FIELD = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-50, 50),
        st.integers(0, 100),
    ),
    st.just({"type": "boolean"}),
    st.lists(st.sampled_from(["a", "bb", "red", "x y"]), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
)
_NAMES = st.sampled_from(["id", "name", "size", "ok", "kind", "note"])


def _object(fields: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_NAMES, fields, min_size=1, max_size=3).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )


_SCHEMAS = _object(st.one_of(_FIELD, _object(_FIELD)))


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=_SCHEMAS, seed=st.integers(0, 2**16))
def test_generated_schemas_in_the_supported_subset_always_validate(
    engine: TorchEngine, schema: dict[str, Any], seed: int
) -> None:
    request = ask(response_format=ResponseFormat("json_schema", schema), seed=seed)
    chunks = asyncio.run(collect(engine, request))
    assert chunks[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(chunks)), schema)
