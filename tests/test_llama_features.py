"""LlamaCppEngine's OpenAI features on the demo GGUF, checked against TorchEngine on the
same weights: prompt token counts, logprobs, penalties, logit bias, embeddings."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from _chunk_support import collect, loaded, text_of, token_indices, tokens_of
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import InvalidRequestError
from kensho.runtime.engines.base import (
    FEATURES,
    GenerationRequest,
    common_features,
    features_of,
)
from kensho.runtime.engines.faulty import MockCPUEngine
from kensho.runtime.engines.llama_engine import LlamaCppEngine
from kensho.runtime.engines.torch_engine import TorchEngine

# Not imported here: importing llama_cpp leaks a /dev/null handle (a ResourceWarning);
# the engines import it in their own processes.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (extra `llama`)", allow_module_level=True)

pytestmark = pytest.mark.asyncio(loop_scope="module")

GGUF = DEMO_MODEL_DIR / "model.gguf"
PROMPT = "The GPU"
LOGPROB_ABS, LOGPROB_REL = 1e-3, 1e-3  # F32 both sides; the kernels sum differently


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def llama() -> AsyncIterator[LlamaCppEngine]:
    async with loaded(LlamaCppEngine(GGUF, n_threads=1)) as eng:
        yield eng


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def torch() -> AsyncIterator[TorchEngine]:
    async with loaded(TorchEngine(DEMO_MODEL_DIR, name="torch")) as eng:
        yield eng


async def test_declares_every_feature_and_a_mixed_pair_honours_the_common_set(
    llama: LlamaCppEngine, torch: TorchEngine
) -> None:
    assert features_of(llama) == FEATURES
    assert common_features((torch, llama)) == FEATURES
    assert common_features((llama, MockCPUEngine())) == frozenset()


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(prompt=PROMPT, max_tokens=3, temperature=0),
        GenerationRequest.chat([("user", "Where did they eat?")], max_tokens=3, temperature=0),
    ],
    ids=["prompt", "chat"],
)
async def test_first_chunk_counts_the_prompt_like_torch(
    llama: LlamaCppEngine, torch: TorchEngine, request_: GenerationRequest
) -> None:
    ours, theirs = await collect(llama, request_), await collect(torch, request_)
    assert ours[0].prompt_tokens == theirs[0].prompt_tokens
    assert ours[0].prompt_tokens is not None and ours[0].prompt_tokens > 1
    assert tokens_of(ours) == 3 and all(c.prompt_tokens is None for c in ours[1:])


async def test_a_continued_request_counts_the_prompt_without_the_continuation(
    llama: LlamaCppEngine, torch: TorchEngine
) -> None:
    request = GenerationRequest(prompt=PROMPT, max_tokens=8, temperature=0).continued(" is", 1)
    ours, theirs = await collect(llama, request), await collect(torch, request)
    assert ours[0].prompt_tokens == theirs[0].prompt_tokens == 2
    assert token_indices(ours)[0] == token_indices(theirs)[0] == 1


async def test_greedy_logprobs_are_close_to_torchs(
    llama: LlamaCppEngine, torch: TorchEngine
) -> None:
    request = GenerationRequest(
        prompt=PROMPT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    ours, theirs = await collect(llama, request), await collect(torch, request)
    assert text_of(ours) == text_of(theirs)
    assert [len(c.logprobs) for c in ours] == [c.tokens for c in ours]
    mine = [e for c in ours for e in c.logprobs]
    expected_entries = [e for c in theirs for e in c.logprobs]
    assert len(mine) == len(expected_entries) == 12
    for entry, expected in zip(mine, expected_entries, strict=True):
        assert (entry.token, entry.token_bytes) == (expected.token, expected.token_bytes)
        assert entry.logprob == pytest.approx(expected.logprob, abs=LOGPROB_ABS, rel=LOGPROB_REL)
        assert entry.logprob <= 0
        assert [t for t, _, _ in entry.top] == [t for t, _, _ in expected.top]
        assert [lp for _, lp, _ in entry.top] == pytest.approx(
            [lp for _, lp, _ in expected.top], abs=LOGPROB_ABS, rel=LOGPROB_REL
        )
        assert entry.top[0][1] == pytest.approx(entry.logprob)  # greedy: the best one


async def test_logprobs_at_a_temperature_are_those_of_the_scaled_distribution(
    llama: LlamaCppEngine, torch: TorchEngine
) -> None:
    sampled = GenerationRequest(prompt=PROMPT, max_tokens=1, temperature=0.7, seed=3, logprobs=True)
    ((entry,),) = [c.logprobs for c in await collect(llama, sampled)]
    # Torch's top 20 at the same temperature holds the token llama.cpp drew (384 ids).
    wide = GenerationRequest(
        prompt=PROMPT, max_tokens=1, temperature=0.7, seed=3, logprobs=True, top_logprobs=20
    )
    ((reference,),) = [c.logprobs for c in await collect(torch, wide)]
    scaled = {raw: lp for _, lp, raw in reference.top}
    assert entry.logprob == pytest.approx(
        scaled[entry.token_bytes], abs=LOGPROB_ABS, rel=LOGPROB_REL
    )
    assert math.fsum(math.exp(lp) for lp in scaled.values()) <= 1.0 + 1e-6


async def test_no_logprobs_unless_asked(llama: LlamaCppEngine) -> None:
    chunks = await collect(llama, GenerationRequest(prompt=PROMPT, max_tokens=3, temperature=0))
    assert all(c.logprobs == () for c in chunks)


async def test_penalties_give_torchs_text(llama: LlamaCppEngine, torch: TorchEngine) -> None:
    plain = GenerationRequest(prompt="1 2 3", max_tokens=30, temperature=0)
    penalised = GenerationRequest(
        prompt="1 2 3", max_tokens=30, temperature=0, frequency_penalty=2.0, presence_penalty=1.5
    )
    ours = text_of(await collect(llama, penalised))
    assert ours == text_of(await collect(torch, penalised))
    assert ours != text_of(await collect(llama, plain))  # the penalties changed the answer


async def test_penalties_count_the_continuation_like_an_uninterrupted_run(
    llama: LlamaCppEngine,
) -> None:
    request = GenerationRequest(
        prompt="1 2 3",
        max_tokens=30,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=1.5,
        logprobs=True,  # each token's bytes: the head is exactly 10 tokens, however chunked
    )
    whole = await collect(llama, request)
    head = b"".join([e.token_bytes for c in whole for e in c.logprobs][:10]).decode()
    rest = await collect(llama, request.continued(head, 10))
    assert head + text_of(rest) == text_of(whole)
    # The head as part of the prompt instead: its tokens are not penalised, and the
    # rest differs, so the continued request did count them.
    forgetful = dataclasses.replace(request, prompt="1 2 3" + head, max_tokens=20)
    unpenalised_head = await collect(llama, forgetful)
    assert text_of(unpenalised_head) != text_of(rest)  # so the head's tokens were counted


async def test_logit_bias_steers_and_bans_tokens_like_torch(
    llama: LlamaCppEngine, torch: TorchEngine
) -> None:
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    plain = await collect(llama, GenerationRequest(prompt=PROMPT, max_tokens=1, temperature=0))
    (best,) = tok(plain[0].text, add_special_tokens=False).input_ids
    banned = GenerationRequest(
        prompt=PROMPT, max_tokens=1, temperature=0, logit_bias=((best, -100.0),)
    )
    ours = await collect(llama, banned)
    assert text_of(ours) != plain[0].text
    assert text_of(ours) == text_of(await collect(torch, banned))
    forced_id = tok(" cat", add_special_tokens=False).input_ids[0]
    forced = GenerationRequest(
        prompt=PROMPT, max_tokens=4, temperature=1.0, seed=1, logit_bias=((forced_id, 100.0),)
    )
    assert text_of(await collect(llama, forced)) == tok.decode([forced_id] * 4)


async def test_a_bias_on_an_unknown_token_is_the_clients_error(llama: LlamaCppEngine) -> None:
    request = GenerationRequest(prompt=PROMPT, max_tokens=1, logit_bias=((10**6, 1.0),))
    with pytest.raises(InvalidRequestError) as err:
        await collect(llama, request)
    assert err.value.param == "logit_bias"
    assert "10000000" not in str(err.value) and "1000000" in str(err.value)


async def test_embeddings_are_close_to_torchs_and_normalised(
    llama: LlamaCppEngine, torch: TorchEngine
) -> None:
    request = GenerationRequest.embedding(["hello world", "the GPU"])
    ours, theirs = await collect(llama, request), await collect(torch, request)
    assert [c.index for c in ours] == [0, 1]
    assert [c.finish_reason for c in ours] == [None, "stop"]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.embedding is not None and reference.embedding is not None
        assert len(mine.embedding) == len(reference.embedding)
        assert mine.embedding == pytest.approx(reference.embedding, abs=1e-4)
        assert math.fsum(x * x for x in mine.embedding) == pytest.approx(1.0, abs=1e-5)
        assert mine.prompt_tokens == reference.prompt_tokens


async def test_same_text_same_vector_and_token_ids_mean_the_same_text(
    llama: LlamaCppEngine,
) -> None:
    await collect(llama, GenerationRequest(prompt=PROMPT, max_tokens=2))  # between two uses
    ids = (258, 280, 80, 365, 77, 69)  # "hello world" in the demo's tokenizer
    chunks = await collect(
        llama, GenerationRequest.embedding(["hello world", "other", "hello world", ids])
    )
    vectors = [c.embedding for c in chunks]
    assert vectors[0] == vectors[2] == vectors[3]
    assert vectors[0] != vectors[1]
    after = await collect(llama, GenerationRequest(prompt=PROMPT, max_tokens=8, temperature=0))
    assert text_of(after).startswith(" is fast.")  # generation is untouched by embedding


async def test_a_continued_embedding_request_embeds_only_the_rest(llama: LlamaCppEngine) -> None:
    request = GenerationRequest.embedding(["a", "b", "c"])
    whole = await collect(llama, request)
    rest = await collect(llama, request.continued("", 1))
    assert [c.index for c in rest] == [1, 2]
    assert [c.embedding for c in rest] == [c.embedding for c in whole[1:]]


async def test_bad_embedding_input_is_refused_before_any_vector(llama: LlamaCppEngine) -> None:
    stream = llama.generate(GenerationRequest.embedding(["fine", (1, 10**6)]))
    with pytest.raises(InvalidRequestError) as err:
        await anext(stream)  # the very first chunk is the error: nothing was embedded
    assert err.value.param == "input"
    with pytest.raises(InvalidRequestError) as long:
        await collect(llama, GenerationRequest.embedding(["word " * 400]))
    assert long.value.code == "context_length_exceeded"
    assert long.value.param == "input"
