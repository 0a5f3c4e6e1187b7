"""``kensho up --engine llama``: the demo's GGUF from a fresh HOME, with the openai client."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from _server_support import kensho_env, kensho_up

# Not imported here: importing llama_cpp leaks a /dev/null handle (a ResourceWarning);
# the engines import it in their own processes.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (extra `llama`)", allow_module_level=True)

pytestmark = pytest.mark.slow

DEMO = "kensho-demo"


def test_kensho_up_engine_llama_serves_the_demo_gguf(tmp_path: Path) -> None:
    with kensho_up("--engine", "llama", env=kensho_env(tmp_path), cwd=tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        stream = client.chat.completions.create(
            model=DEMO,
            messages=[{"role": "user", "content": "Where did they eat?"}],
            max_tokens=40,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        # The opening delta, the first token alone (time to first token), then the
        # rest as fast as this client reads: tokens that wait for it come merged.
        assert len(pieces) >= 3 and pieces[0] == ""
        assert "".join(pieces) == " In the café by the river. They had crème brûlée."
        text = client.completions.create(model=DEMO, prompt="The GPU", max_tokens=8, temperature=0)
        assert text.choices[0].text.startswith(" is fast.")
        with pytest.raises(openai.BadRequestError) as too_long:
            client.completions.create(model=DEMO, prompt="word " * 400, max_tokens=4)
        assert too_long.value.code == "context_length_exceeded"
        check_the_openai_features(client)
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["integrity"] == {**ready["integrity"], "status": "ok", "files": {"ok": 8}}
        assert ready["active_engine"] == "cpu"
    assert (tmp_path / "kensho" / "demo" / "model.gguf").is_file()  # served from the store
    logs = [json.loads(line) for line in server.stderr if line.startswith("{")]
    loaded = [e for e in logs if e["event"] == "engine loaded"]
    assert {e["service"] for e in loaded} == {"runtime.engine.llama"}
    assert str(tmp_path / "kensho" / "demo" / "model.gguf") in {e["model"] for e in loaded}


def check_the_openai_features(client: openai.OpenAI) -> None:
    """Usage, logprobs, penalties and embeddings on the llama engine (same server)."""
    reply = client.chat.completions.create(
        model=DEMO,
        messages=[{"role": "user", "content": "Where did they eat?"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        frequency_penalty=0.5,
        logit_bias={"300": -5},
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(e.token for e in logprobs.content) == reply.choices[0].message.content
    for entry in logprobs.content:
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert len(entry.top_logprobs) == 2
    vectors = client.embeddings.create(model=DEMO, input=["hello world", "hello world", "x"])
    first, again, other = (item.embedding for item in vectors.data)
    assert first == again != other
    assert math.fsum(x * x for x in first) == pytest.approx(1.0, abs=1e-5)
    assert vectors.usage.prompt_tokens > 0
    check_structured_output_and_tools(client)


def check_structured_output_and_tools(client: openai.OpenAI) -> None:
    """A JSON schema and a named tool call, constrained in the llama.cpp child."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    ask: Any = [{"role": "user", "content": "Tell me about it."}]
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": schema, "strict": True},
    }
    answer = client.chat.completions.create(
        model=DEMO,
        messages=ask,
        max_tokens=150,
        seed=3,
        response_format=response_format,
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)
    tool: Any = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    called = client.chat.completions.create(
        model=DEMO,
        messages=ask,
        max_tokens=150,
        seed=3,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema)
