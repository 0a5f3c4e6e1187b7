"""The OpenAI surface applications depend on, with the official ``openai`` client against
``kensho up`` (the demo model on the torch engine) as a real subprocess: usage,
logprobs, penalties, logit bias, embeddings, model lookup, and a 400 naming each field
that is not honoured."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from _server_support import Server, kensho_env, kensho_up
from kensho.demo import DEMO_MODEL_DIR

pytestmark = pytest.mark.slow

DEMO = "kensho-demo"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("surface")
    with kensho_up(env=kensho_env(home), cwd=home) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)


def test_usage_counts_the_prompt_in_the_models_tokens(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    reply = client.chat.completions.create(
        model=DEMO,
        messages=HELLO,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    text = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == prompt_tokens > 0
    assert reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == prompt_tokens + 4
    stream = client.chat.completions.create(
        model=DEMO,
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage == reply.usage
    text_reply = client.completions.create(model=DEMO, prompt="The GPU", max_tokens=3)
    assert text_reply.usage is not None
    assert text_reply.usage.prompt_tokens == len(tokenizer("The GPU").input_ids)


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    options: dict[str, Any] = {
        "model": DEMO,
        "messages": HELLO,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    reply = client.chat.completions.create(**options)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == 8
    assert bytes(b for e in entries for b in (e.bytes or [])).decode() == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert math.fsum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
        assert entry.logprob <= 0
    streamed = [
        e
        for chunk in client.chat.completions.create(**options, stream=True)
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completion_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=DEMO, prompt="The GPU", max_tokens=5, temperature=0, logprobs=2
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None
    tokens = choice.logprobs.tokens or []
    assert "".join(tokens) == choice.text
    assert len(choice.logprobs.token_logprobs or []) == 5
    offsets = choice.logprobs.text_offset or []
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(5)]
    for token, top in zip(tokens, choice.logprobs.top_logprobs or [], strict=True):
        assert token in top
        assert len(top) == 2  # greedy: the sampled token is one of the two likeliest
    stream = client.completions.create(
        model=DEMO, prompt="The GPU", max_tokens=5, temperature=0, logprobs=2, stream=True
    )
    columns = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for c in columns for t in c.tokens or []] == tokens
    assert [o for c in columns for o in c.text_offset or []] == offsets  # carried on


def test_penalties_and_logit_bias_change_what_is_sampled(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    def complete(**options: Any) -> str:
        options = {"max_tokens": 30, **options}
        reply = client.completions.create(model=DEMO, prompt="1 2 3", temperature=0, **options)
        return reply.choices[0].text

    plain = complete()
    assert complete(frequency_penalty=2.0, presence_penalty=1.5) != plain
    first = tokenizer(plain, add_special_tokens=False).input_ids[0]
    banned = complete(logit_bias={str(first): -100}, max_tokens=1)
    assert banned != tokenizer.decode([first])
    with pytest.raises(openai.BadRequestError) as err:
        complete(logit_bias={"100000": 5})
    assert err.value.param == "logit_bias"


def test_embeddings_float_base64_lists_and_token_ids(client: openai.OpenAI, tokenizer: Any) -> None:
    # The official client asks for base64 unless told otherwise, and decodes it.
    default = client.embeddings.create(model=DEMO, input="offline first").data[0].embedding
    floats = (
        client.embeddings.create(model=DEMO, input="offline first", encoding_format="float")
        .data[0]
        .embedding
    )
    assert default == pytest.approx(floats, abs=1e-7)
    assert math.fsum(x * x for x in floats) == pytest.approx(1.0, abs=1e-5)
    ids = tokenizer("offline first").input_ids
    many = client.embeddings.create(
        model=DEMO, input=["the GPU", "offline first"], encoding_format="float"
    )
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[1].embedding == floats  # same text, same vector
    assert many.data[0].embedding != floats
    assert many.usage.prompt_tokens == len(tokenizer("the GPU").input_ids) + len(ids)
    by_ids = client.embeddings.create(model=DEMO, input=ids, encoding_format="float")
    assert by_ids.data[0].embedding == floats
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=DEMO, input="x", dimensions=8)
    assert err.value.param == "dimensions"


def test_embeddings_go_through_the_executor(server: Server) -> None:
    body = {"model": DEMO, "input": "hi"}
    url = server.url + "/v1/embeddings"
    assert httpx.post(url, json=body, headers={"X-Kensho-Priority": "high"}).status_code == 200
    r = httpx.post(url, json=body, headers={"X-Kensho-Priority": "urgent"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-kensho-priority"


def test_model_lookup(client: openai.OpenAI) -> None:
    assert client.models.retrieve(DEMO).id == DEMO
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("param", "options"),
    [
        ("n", {"n": 2}),
        ("audio", {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}),
        ("modalities", {"modalities": ["audio"]}),
        ("prediction", {"prediction": {"type": "content", "content": "Hello"}}),
        ("reasoning_effort", {"reasoning_effort": "low"}),
        ("top_k", {"extra_body": {"top_k": 4}}),
    ],
)
def test_fields_not_honoured_are_a_400_naming_them(
    client: openai.OpenAI, param: str, options: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=DEMO, messages=HELLO, max_tokens=2, **options)  # type: ignore[arg-type]
    assert err.value.param == param
