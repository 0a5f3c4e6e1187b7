"""TorchEngine's OpenAI features on the demo model: logprobs, penalties, logit bias,
prompt token counts and embeddings, checked against plain transformers."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _chunk_support import collect, tokens_of
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import InvalidRequestError
from kensho.runtime.engines.base import FEATURES, GenerationRequest, features_of
from kensho.runtime.engines.faulty import MockCPUEngine
from kensho.runtime.engines.inject import FaultInjector
from kensho.runtime.engines.torch_engine import TorchEngine

PROMPT = "The GPU"


@pytest.fixture(scope="module")
def engine() -> Iterator[TorchEngine]:
    eng = TorchEngine(DEMO_MODEL_DIR, device="cpu")
    asyncio.run(eng.load())
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, local_files_only=True).eval()
    return tok, model


def next_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # type: ignore[no-any-return]


def reference_greedy(
    reference: tuple[Any, Any], n: int, adjust: Any = None, prompt: str = PROMPT
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding without a KV cache; ``adjust(logits, generated)`` edits logits."""
    tok, model = reference
    ids = tok(prompt, return_tensors="pt").input_ids[0].tolist()
    generated: list[int] = []
    scores: list[torch.Tensor] = []
    for _ in range(n):
        logits = next_logits(model, ids + generated)
        if adjust is not None:
            logits = adjust(logits, generated)
        scores.append(logits)
        generated.append(int(torch.argmax(logits).item()))
    return generated, scores


def test_the_torch_engine_declares_every_feature(engine: TorchEngine) -> None:
    assert features_of(engine) == FEATURES
    assert features_of(FaultInjector(engine)) == FEATURES
    assert features_of(MockCPUEngine()) == frozenset()


async def test_first_chunk_reports_the_prompt_in_tokens(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    chunks = await collect(engine, GenerationRequest(prompt=PROMPT, max_tokens=3, temperature=0))
    tok, _ = reference
    assert chunks[0].prompt_tokens == len(tok(PROMPT).input_ids)
    assert tokens_of(chunks) == 3 and all(c.prompt_tokens is None for c in chunks[1:])


async def test_logprobs_are_the_models_own_distribution(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    request = GenerationRequest(
        prompt=PROMPT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    chunks = await collect(engine, request)
    expected_ids, scores = reference_greedy(reference, 6)
    tok, _ = reference
    for chunk, token_id, logits in zip(chunks, expected_ids, scores, strict=True):
        (entry,) = chunk.logprobs
        logprobs = torch.log_softmax(logits, -1)
        assert entry.token_bytes == tok.decode([token_id]).encode()
        assert entry.logprob == pytest.approx(logprobs[token_id].item(), abs=1e-4)
        top_ids = torch.topk(logprobs, 3).indices.tolist()
        assert [t for t, _, _ in entry.top] == [tok.decode([i]) for i in top_ids]
        assert entry.top[0][1] == pytest.approx(entry.logprob)  # greedy: the best one


async def test_logprobs_at_a_temperature_are_those_of_the_scaled_distribution(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    request = GenerationRequest(prompt=PROMPT, max_tokens=1, temperature=0.7, seed=3, logprobs=True)
    (chunk,) = await collect(engine, request)
    tok, model = reference
    logits = next_logits(model, tok(PROMPT).input_ids)
    token_id = tok(chunk.logprobs[0].token_bytes.decode(), add_special_tokens=False).input_ids
    expected = torch.log_softmax(logits / 0.7, -1)[token_id[0]].item()
    assert chunk.logprobs[0].logprob == pytest.approx(expected, abs=1e-4)


async def test_no_logprobs_unless_asked(engine: TorchEngine) -> None:
    chunks = await collect(engine, GenerationRequest(prompt=PROMPT, max_tokens=3, temperature=0))
    assert all(c.logprobs == () for c in chunks)


async def test_penalties_match_the_formula_applied_by_hand(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    def penalise(logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        out = logits.clone()
        for token_id in set(generated):
            out[token_id] -= generated.count(token_id) * 2.0 + 1.5
        return out

    # The demo model is sure of itself: on this prompt the penalties change the answer.
    prompt = "1 2 3"
    expected, _ = reference_greedy(reference, 30, penalise, prompt)
    plain, _ = reference_greedy(reference, 30, None, prompt)
    assert expected != plain
    request = GenerationRequest(
        prompt=prompt, max_tokens=30, temperature=0, frequency_penalty=2.0, presence_penalty=1.5
    )
    chunks = await collect(engine, request)
    tok, _ = reference
    produced = "".join(c.text for c in chunks)
    assert produced == tok.decode(expected[: tokens_of(chunks)], skip_special_tokens=True)


async def test_logit_bias_steers_and_bans_tokens(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    tok, _ = reference
    plain, _ = reference_greedy(reference, 1)
    banned = GenerationRequest(
        prompt=PROMPT, max_tokens=1, temperature=0, logit_bias=((plain[0], -100.0),)
    )
    (chunk,) = await collect(engine, banned)
    assert chunk.text != tok.decode(plain)
    forced_id = tok(" cat", add_special_tokens=False).input_ids[0]
    forced = GenerationRequest(
        prompt=PROMPT, max_tokens=4, temperature=1.0, seed=1, logit_bias=((forced_id, 100.0),)
    )
    chunks = await collect(engine, forced)
    assert "".join(c.text for c in chunks) == tok.decode([forced_id] * 4)


async def test_a_bias_on_an_unknown_token_is_the_clients_error(engine: TorchEngine) -> None:
    request = GenerationRequest(prompt=PROMPT, max_tokens=1, logit_bias=((10**6, 1.0),))
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, request)
    assert err.value.param == "logit_bias"


async def test_embeddings_are_the_normalised_mean_of_the_last_hidden_state(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    tok, model = reference
    chunks = await collect(engine, GenerationRequest.embedding(["hello world", "the GPU"]))
    assert [c.index for c in chunks] == [0, 1]
    assert [c.finish_reason for c in chunks] == [None, "stop"]
    ids = tok("hello world").input_ids
    with torch.inference_mode():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=-1)
    vector = chunks[0].embedding
    assert vector is not None
    assert len(vector) == model.config.hidden_size
    assert vector == pytest.approx(expected.tolist(), abs=1e-5)
    assert math.fsum(x * x for x in vector) == pytest.approx(1.0)
    assert chunks[0].prompt_tokens == len(ids)


async def test_same_text_same_vector_and_token_ids_mean_the_same_text(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    tok, _ = reference
    ids = tuple(tok("offline first").input_ids)
    chunks = await collect(
        engine, GenerationRequest.embedding(["offline first", "other", "offline first", ids])
    )
    vectors = [c.embedding for c in chunks]
    assert vectors[0] == vectors[2] == vectors[3]
    assert vectors[0] != vectors[1]


async def test_a_continued_embedding_request_embeds_only_the_rest(engine: TorchEngine) -> None:
    request = GenerationRequest.embedding(["a", "b", "c"])
    whole = await collect(engine, request)
    rest = await collect(engine, request.continued("", 1))
    assert [c.index for c in rest] == [1, 2]
    assert [c.embedding for c in rest] == [c.embedding for c in whole[1:]]


async def test_bad_embedding_input_is_refused_before_any_vector(engine: TorchEngine) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, GenerationRequest.embedding(["fine", (1, 10**6)]))
    assert err.value.param == "input"
    with pytest.raises(InvalidRequestError) as long:
        await collect(engine, GenerationRequest.embedding(["word " * 400]))
    assert long.value.code == "context_length_exceeded"


async def test_the_mock_engines_refuse_what_they_cannot_honour() -> None:
    mock = MockCPUEngine(time_to_first_token=0, time_per_token=0)
    await mock.load()
    with pytest.raises(InvalidRequestError, match="logprobs"):
        async for _ in mock.generate(GenerationRequest(prompt="x", logprobs=True)):
            pass
    chunks = [c async for c in mock.generate(GenerationRequest(prompt="two words", max_tokens=2))]
    assert chunks[0].prompt_tokens == 2
