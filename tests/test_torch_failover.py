"""Failover with a real model: the user receives exactly what the CPU alone would say."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

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
    assert [c.engine for c in chunks[:7]] == ["gpu"] * 7
    assert {c.engine for c in chunks[7:]} == {"cpu"}
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
