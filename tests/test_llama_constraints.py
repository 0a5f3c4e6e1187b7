"""Structured output and tool calls on LlamaCppEngine: the torch engine's llguidance
grammar, applied inside the llama.cpp child to the same demo weights."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator

import jsonschema
import pytest
import pytest_asyncio

from _chunk_support import collect, loaded, text_of
from _schema_support import ADD, PERSON, TOOLS, WEATHER, ask, check_calls
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import InvalidRequestError
from kensho.runtime.engines.llama_engine import LlamaCppEngine
from kensho.runtime.engines.structured import (
    NamedTool,
    ResponseFormat,
    ToolSpec,
    supports_constraints,
)
from kensho.runtime.engines.torch_engine import TorchEngine

# Not imported here: importing llama_cpp leaks a /dev/null handle (a ResourceWarning);
# the engines import it in their own processes.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (extra `llama`)", allow_module_level=True)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def llama() -> AsyncIterator[LlamaCppEngine]:
    async with loaded(LlamaCppEngine(DEMO_MODEL_DIR / "model.gguf", n_threads=1)) as eng:
        yield eng


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def torch() -> AsyncIterator[TorchEngine]:
    async with loaded(TorchEngine(DEMO_MODEL_DIR, name="torch")) as eng:
        yield eng


async def test_the_llama_engine_declares_constraints(llama: LlamaCppEngine) -> None:
    assert supports_constraints(llama)


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_schema_output_validates_at_temperature_1(llama: LlamaCppEngine, seed: int) -> None:
    chunks = await collect(
        llama, ask(response_format=ResponseFormat("json_schema", PERSON), seed=seed)
    )
    assert chunks[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(chunks)), PERSON)


async def test_greedy_constrained_answers_equal_the_torch_engines(
    llama: LlamaCppEngine, torch: TorchEngine
) -> None:
    for request in (
        ask(response_format=ResponseFormat("json_schema", PERSON), temperature=0),
        ask(tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80),
        ask(tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=40),
    ):
        ours, theirs = await collect(llama, request), await collect(torch, request)
        assert text_of(ours) == text_of(theirs)
        assert ours[0].prompt_tokens == theirs[0].prompt_tokens  # the tools were rendered
        assert ours[-1].finish_reason == theirs[-1].finish_reason


async def test_json_mode_answers_that_finish_are_json_objects(llama: LlamaCppEngine) -> None:
    finished = 0
    for seed in (0, 4, 5):
        request = ask(response_format=ResponseFormat("json_object"), seed=seed, max_tokens=60)
        chunks = await collect(llama, request)
        if chunks[-1].finish_reason == "stop":
            assert isinstance(json.loads(text_of(chunks)), dict)
            finished += 1
        else:
            assert chunks[-1].finish_reason == "length"
            assert text_of(chunks).startswith("{")
    assert finished >= 1


async def test_a_complete_grammar_ends_on_its_last_token(llama: LlamaCppEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"const": "yes"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    whole = await collect(llama, ask(response_format=ResponseFormat("json_schema", schema)))
    assert text_of(whole) == '{"answer": "yes"}'
    assert whole[-1].finish_reason == "stop"
    cut = await collect(
        llama, ask(response_format=ResponseFormat("json_schema", schema), max_tokens=3)
    )
    assert cut[-1].finish_reason == "length"
    assert '{"answer": "yes"}'.startswith(text_of(cut))


@pytest.mark.parametrize("seed", [0, 1])
async def test_required_and_named_tool_choices_make_valid_calls(
    llama: LlamaCppEngine, seed: int
) -> None:
    named = ask(tools=TOOLS, tool_choice=NamedTool("add"), parallel_tool_calls=False, seed=seed)
    chunks = await collect(llama, named)
    assert chunks[-1].finish_reason == "stop"
    assert [call.name for call in check_calls(text_of(chunks), (ADD,))] == ["add"]
    chunks = await collect(llama, ask(tools=TOOLS, tool_choice="required", seed=seed))
    finished = text_of(chunks)
    if chunks[-1].finish_reason == "length":  # parallel calls may run to max_tokens
        finished = finished.rsplit("\n<tool_call>", 1)[0]
    check_calls(finished, TOOLS)


async def test_a_continued_constrained_stream_is_the_uninterrupted_one(
    llama: LlamaCppEngine,
) -> None:
    # Greedy, and a schema whose every value is bounded (greedy decoding of an
    # unbounded integer repeats one digit to max_tokens).
    schema = dict(WEATHER.parameters)
    request = ask(response_format=ResponseFormat("json_schema", schema), temperature=0)
    whole = await collect(llama, request)
    head = whole[:5]
    rest = await collect(llama, request.continued(text_of(head), len(head)))
    assert text_of(head) + text_of(rest) == text_of(whole)
    assert whole[-1].finish_reason == rest[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(whole)), schema)


async def test_a_keyword_that_cannot_be_enforced_is_refused_by_name(
    llama: LlamaCppEngine,
) -> None:
    unenforceable = {"type": "object", "not": {"required": ["a"]}}
    for _ in range(2):  # a refused schema is not remembered as a good one
        with pytest.raises(InvalidRequestError, match="not") as fmt_error:
            await collect(llama, ask(response_format=ResponseFormat("json_schema", unenforceable)))
        assert fmt_error.value.param == "response_format"
    tools = (WEATHER, ToolSpec("bad", "", unenforceable))
    with pytest.raises(InvalidRequestError, match="not") as tool_error:
        await collect(llama, ask(tools=tools, tool_choice="required"))
    assert tool_error.value.param == "tools[1].function.parameters"
