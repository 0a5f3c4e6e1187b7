"""The field audit in process: every OpenAI field honoured or refused with a 400 naming it.

On the fault-injecting engines, which declare no features: what needs one (logprobs,
penalties, logit bias, embeddings) is refused here, and honoured on the torch engine
(test_openai_surface_e2e.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from _http_support import sse_data
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines.faulty import MockCPUEngine, MockGPUEngine
from kensho.runtime.executor import TaskExecutor
from kensho.runtime.manager import RuntimeManager
from kensho.server import ServerContext, create_app

MODEL = "mock-model"
CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 3,
}
TEXT: dict[str, Any] = {"model": MODEL, "prompt": "one two three", "max_tokens": 3}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    clock = VirtualClock()
    gpu = MockGPUEngine(clock=clock, time_to_first_token=0, time_per_token=0)
    cpu = MockCPUEngine(clock=clock, time_to_first_token=0, time_per_token=0)
    runtime = RuntimeManager(gpu, cpu, clock=clock)
    await runtime.start()
    executor = TaskExecutor(runtime, clock=clock, concurrency={"gpu": 1, "cpu": 1})
    ctx = ServerContext(runtime=runtime, executor=executor, hub=executor.hub, model_id=MODEL)
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000") as c:
        yield c
    await executor.aclose()
    await runtime.close()


def refused(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    return str(error["message"])


REFUSED_CHAT = [
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("modalities", {"modalities": ["text", "audio"]}, "text only"),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("web_search_options", {"web_search_options": {}}, "offline"),
    ("reasoning_effort", {"reasoning_effort": "high"}, "reasoning"),
    ("verbosity", {"verbosity": "low"}, "verbosity"),
    ("store", {"store": True}, "stored"),
    ("metadata", {"metadata": {"k": "v"}}, "stored"),
    ("service_tier", {"service_tier": "flex"}, "X-Kensho-Priority"),
    ("n", {"n": 2}, "1"),
    ("stream_options", {"stream_options": {"include_usage": True}}, "stream is true"),
    ("stream_options", {"stream": True, "stream_options": {"include_obfuscation": True}}, "obfusc"),
    ("top_logprobs", {"top_logprobs": 2}, "logprobs"),
    ("logprobs", {"logprobs": True}, "logprobs"),
    ("frequency_penalty", {"frequency_penalty": 0.5}, "penalties"),
    ("presence_penalty", {"presence_penalty": -0.5}, "penalties"),
    ("logit_bias", {"logit_bias": {"7": 10}}, "logit_bias"),
    ("frequency_penalty", {"frequency_penalty": 2.5}, "less than or equal to 2"),
    ("logit_bias", {"logit_bias": {"seven": 1}}, "token ids"),
    ("logit_bias.7", {"logit_bias": {"7": 101}}, "less than or equal to 100"),
    ("top_k", {"top_k": 5}, "Unrecognized request argument supplied: top_k"),
]


@pytest.mark.parametrize(("param", "extra", "says"), REFUSED_CHAT)
async def test_chat_field_not_honoured_is_400_naming_it(
    client: httpx.AsyncClient, param: str, extra: dict[str, Any], says: str
) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert says in refused(r, param)


REFUSED_TEXT = [
    ("suffix", {"suffix": " the end"}, "suffix"),
    ("best_of", {"best_of": 3}, "1"),
    ("echo", {"echo": True, "logprobs": 1}, "echo"),
    ("logprobs", {"logprobs": 2}, "logprobs"),
    ("logprobs", {"logprobs": 6}, "less than or equal to 5"),
    ("prompt", {"prompt": [1, 2, 3]}, "token ids"),
    ("audio", {"audio": {"voice": "alloy"}}, "Unrecognized"),  # not a completions field
]


@pytest.mark.parametrize(("param", "extra", "says"), REFUSED_TEXT)
async def test_completion_field_not_honoured_is_400_naming_it(
    client: httpx.AsyncClient, param: str, extra: dict[str, Any], says: str
) -> None:
    r = await client.post("/v1/completions", json={**TEXT, **extra})
    assert says in refused(r, param)


async def test_values_that_ask_for_nothing_are_accepted(client: httpx.AsyncClient) -> None:
    defaults = {
        "logprobs": False,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logit_bias": {},
        "audio": None,
        "modalities": ["text"],
        "store": False,
        "metadata": None,
        "service_tier": "auto",
        "n": 1,
        "user": "user-1234",
        "safety_identifier": "abc",
        "prompt_cache_key": "k",
        "prediction": None,
    }
    r = await client.post("/v1/chat/completions", json={**CHAT, **defaults})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None
    r = await client.post(
        "/v1/completions", json={**TEXT, "best_of": 1, "suffix": None, "echo": False}
    )
    assert r.status_code == 200, r.text


async def test_usage_counts_the_prompt_as_the_engine_read_it(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=CHAT)).json()
    # The mock engines count words; the chat reaches them as "user: hello there".
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    body = (await client.post("/v1/completions", json=TEXT)).json()
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def test_streamed_usage_comes_last_with_no_choices(client: httpx.AsyncClient) -> None:
    payload = {**TEXT, "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post("/v1/completions", json=payload)
    events = [json.loads(d) for d in sse_data(r.text)[:-1]]
    assert all(e["usage"] is None for e in events[:-1])  # as OpenAI: null until the end
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def test_echo_returns_the_prompt_then_the_completion(client: httpx.AsyncClient) -> None:
    plain = (await client.post("/v1/completions", json=TEXT)).json()["choices"][0]["text"]
    echoed = (await client.post("/v1/completions", json={**TEXT, "echo": True})).json()
    assert echoed["choices"][0]["text"] == "one two three" + plain
    r = await client.post("/v1/completions", json={**TEXT, "echo": True, "stream": True})
    texts = [json.loads(d)["choices"][0]["text"] for d in sse_data(r.text)[:-1]]
    assert texts[0] == "one two three"
    assert "".join(texts) == "one two three" + plain


async def test_model_lookup_and_unknown_model(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200
    assert r.json() == {"id": MODEL, "object": "model", "created": 0, "owned_by": "kensho"}
    r = await client.get("/v1/models/org/other-model")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


async def test_unknown_model_is_404_before_any_field_is_judged(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "x", "logprobs": True})
    assert r.status_code == 404


async def test_embeddings_on_engines_without_them_are_refused(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert "cannot make embeddings" in refused(r, "model")
    r = await client.post("/v1/embeddings", json={"model": "other", "input": "hi"})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", 3]}, "input"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hi", "truncate": True}, "truncate"),
    ],
)
async def test_bad_embedding_bodies_name_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] is not None
    assert r.json()["error"]["param"].split(".")[0] == param
