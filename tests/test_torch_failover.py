"""Failover with a real model: the user receives exactly what the CPU alone would say."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from _chunk_support import head_tokens, tokens_of
from kensho.demo import DEMO_MODEL_DIR
from kensho.runtime.engines.base import GenerationChunk, GenerationRequest
from kensho.runtime.engines.inject import FaultInjector
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.manager import RuntimeManager

REQUEST = GenerationRequest(prompt="The GPU", max_tokens=40, temperature=0)


async def _alone() -> str:
    alone = TorchEngine(DEMO_MODEL_DIR, name="reference")
    await alone.load()
    try:
        return "".join([c.text async for c in alone.generate(REQUEST)])
    finally:
        await alone.close()


@pytest.fixture(scope="module")
def reference() -> str:
    """What the CPU engine alone answers to ``REQUEST`` (read-only: computed once)."""
    return asyncio.run(_alone())


@pytest.fixture
async def runtime(reference: str) -> AsyncIterator[tuple[RuntimeManager, FaultInjector, str]]:
    # The "GPU" runs the same weights on the CPU here; only its failures are injected.
    primary = FaultInjector(TorchEngine(DEMO_MODEL_DIR, name="gpu-weights"), name="gpu", kind="gpu")
    manager = RuntimeManager(primary, TorchEngine(DEMO_MODEL_DIR, name="cpu"))
    await manager.start()
    yield manager, primary, reference
    await manager.close()


async def collect(manager: RuntimeManager) -> list[GenerationChunk]:
    return [chunk async for chunk in manager.generate(REQUEST)]


async def test_mid_stream_failure_continues_on_cpu_with_identical_text(
    runtime: tuple[RuntimeManager, FaultInjector, str],
) -> None:
    manager, primary, reference = runtime
    primary.force_failure(after_tokens=7, times=1)
    chunks = await collect(manager)
    assert "".join(c.text for c in chunks) == reference
    engines = [c.engine for c in chunks]
    switch = engines.index("cpu")
    assert set(engines[:switch]) == {"gpu"} and set(engines[switch:]) == {"cpu"}
    assert tokens_of(chunks[:switch]) == 7  # the 7 tokens before the failure, then the CPU
    assert primary.failures == 1
    assert chunks[-1].finish_reason == "length"


async def test_failure_before_first_token_is_invisible_to_the_user(
    runtime: tuple[RuntimeManager, FaultInjector, str],
) -> None:
    manager, primary, reference = runtime
    primary.force_failure(after_tokens=0, times=1)
    chunks = await collect(manager)
    assert "".join(c.text for c in chunks) == reference
    assert {c.engine for c in chunks} == {"cpu"}
    healthy = await collect(manager)  # the next request is back on the primary
    assert {c.engine for c in healthy} == {"gpu"}


async def reference_chunks(request: GenerationRequest) -> list[GenerationChunk]:
    alone = TorchEngine(DEMO_MODEL_DIR, name="reference")
    await alone.load()
    try:
        return [c async for c in alone.generate(request)]
    finally:
        await alone.close()


async def test_penalties_and_logprobs_carry_across_a_mid_stream_failover(
    runtime: tuple[RuntimeManager, FaultInjector, str],
) -> None:
    manager, primary, _ = runtime
    # The penalties count the tokens the primary produced before it died, so the CPU
    # continues the stream it would have produced alone.
    request = GenerationRequest(
        prompt="1 2 3",
        max_tokens=30,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=1.5,
        logprobs=True,
        top_logprobs=2,
    )
    expected = await reference_chunks(request)
    primary.force_failure(after_tokens=12, times=1)
    chunks = [c async for c in manager.generate(request)]
    assert {c.engine for c in head_tokens(chunks, 12)} == {"gpu"}
    assert {c.engine for c in chunks[len(head_tokens(chunks, 12)) :]} == {"cpu"}
    assert "".join(c.text for c in chunks) == "".join(c.text for c in expected)
    got = [(e.token, round(e.logprob, 4)) for c in chunks for e in c.logprobs]
    assert got == [(e.token, round(e.logprob, 4)) for c in expected for e in c.logprobs]


async def test_embeddings_fail_over_without_losing_or_repeating_an_input(
    runtime: tuple[RuntimeManager, FaultInjector, str],
) -> None:
    manager, primary, _ = runtime
    request = GenerationRequest.embedding(["one", "two", "three", "four"])
    expected = await reference_chunks(request)
    primary.force_failure(after_tokens=2, times=1)
    chunks = [c async for c in manager.generate(request)]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.engine for c in chunks] == ["gpu", "gpu", "cpu", "cpu"]
    assert [c.embedding for c in chunks] == [c.embedding for c in expected]
