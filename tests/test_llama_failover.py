"""llama.cpp engine processes that die: the user's text does not change, none is orphaned."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from _chunk_support import token_indices, tokens_of
from _process_support import child_exits_with_its_server
from kensho.demo import DEMO_MODEL_DIR
from kensho.runtime.breaker import BreakerState, CircuitBreaker
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines.base import Engine, GenerationChunk, GenerationRequest
from kensho.runtime.engines.llama_engine import LlamaCppEngine
from kensho.runtime.engines.structured import ResponseFormat
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.manager import RuntimeManager

# Not imported here: importing llama_cpp leaks a /dev/null handle (a ResourceWarning);
# the engines import it in their own processes.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (extra `llama`)", allow_module_level=True)

REQUEST = GenerationRequest(prompt="The GPU", max_tokens=120, temperature=0)
OPEN = 60.0


Rig = tuple[RuntimeManager, LlamaCppEngine, VirtualClock, str]


@asynccontextmanager
async def make_rig(fallback: Engine) -> AsyncIterator[Rig]:
    """A llama.cpp primary (on the CPU here; its crash is real) with ``fallback``."""
    clock = VirtualClock()
    primary = LlamaCppEngine(DEMO_MODEL_DIR / "model.gguf", name="gpu", n_threads=1)
    breaker = CircuitBreaker("gpu", clock=clock, failure_threshold=1, open_duration=OPEN)
    manager = RuntimeManager(primary, fallback, clock=clock, primary_breaker=breaker)
    await manager.start()
    try:
        reference = "".join([c.text async for c in fallback.generate(REQUEST)])
        yield manager, primary, clock, reference
    finally:
        await manager.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    # Mixed pair: the fallback is the torch engine on the same weights.
    async with make_rig(TorchEngine(DEMO_MODEL_DIR, name="cpu")) as built:
        yield built


async def test_sigkill_mid_stream_completes_on_the_fallback_then_a_probe_restarts_it(
    rig: Rig,
) -> None:
    manager, primary, clock, reference = rig
    first_pid = primary.pid
    assert first_pid is not None
    chunks: list[GenerationChunk] = []
    async for chunk in manager.generate(REQUEST):
        chunks.append(chunk)
        if len(chunks) == 5:
            os.kill(first_pid, signal.SIGKILL)
    assert "".join(c.text for c in chunks) == reference
    assert token_indices(chunks) == list(range(tokens_of(chunks)))
    engines = [c.engine for c in chunks]
    switch = engines.index("cpu")
    assert switch >= 5 and set(engines[:switch]) == {"gpu"} and set(engines[switch:]) == {"cpu"}
    assert manager.metrics().continued_mid_stream == 1
    assert manager.primary_breaker.state is BreakerState.OPEN

    await clock.advance(OPEN)  # the breaker lets one probe through to the primary
    probe = [c async for c in manager.generate(GenerationRequest(prompt="The", max_tokens=4))]
    assert {c.engine for c in probe} == {"gpu"}
    assert primary.pid not in (None, first_pid)
    assert primary.processes_started == 2


async def test_a_penalised_stream_with_logprobs_survives_a_sigkill_unchanged(rig: Rig) -> None:
    # The penalties count the tokens the dead primary produced: the text is the
    # fallback's own uninterrupted run, and every token keeps its logprob entry.
    manager, primary, _, _ = rig
    request = GenerationRequest(
        prompt="1 2 3",
        max_tokens=30,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=1.5,
        logprobs=True,
    )
    assert manager.fallback is not None
    reference = [c async for c in manager.fallback.generate(request)]
    pid = primary.pid
    assert pid is not None
    chunks: list[GenerationChunk] = []
    async for chunk in manager.generate(request):
        chunks.append(chunk)
        if len(chunks) == 8:
            os.kill(pid, signal.SIGKILL)
    assert "".join(c.text for c in chunks) == "".join(c.text for c in reference)
    assert {c.engine for c in chunks} == {"gpu", "cpu"}
    assert [len(c.logprobs) for c in chunks] == [c.tokens for c in chunks]
    assert tokens_of(chunks) == tokens_of(reference)
    assert manager.metrics().continued_mid_stream == 1


async def test_a_constrained_answer_survives_a_sigkill_and_still_validates(rig: Rig) -> None:
    # The fallback's grammar starts past the text the dead primary wrote.
    manager, primary, _, _ = rig
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    request = GenerationRequest.chat(
        [("user", "Tell me about it.")],
        max_tokens=150,
        temperature=0,
        response_format=ResponseFormat("json_schema", schema),
    )
    assert manager.fallback is not None
    reference = "".join([c.text async for c in manager.fallback.generate(request)])
    pid = primary.pid
    assert pid is not None
    chunks: list[GenerationChunk] = []
    async for chunk in manager.generate(request):
        chunks.append(chunk)
        if len(chunks) == 6:
            os.kill(pid, signal.SIGKILL)
    assert {c.engine for c in chunks} == {"gpu", "cpu"}
    assert "".join(c.text for c in chunks) == reference
    assert chunks[-1].finish_reason == "stop"
    answer = json.loads(reference)
    assert set(answer) == {"city", "unit"} and answer["unit"] in ("C", "F")


async def test_sigkill_before_the_first_token_is_invisible_with_a_quantized_fallback() -> None:
    fallback = LlamaCppEngine(DEMO_MODEL_DIR / "model-q8_0.gguf", name="cpu", n_threads=1)
    async with make_rig(fallback) as (manager, primary, _, reference):
        assert primary.pid is not None
        os.kill(primary.pid, signal.SIGKILL)
        chunks = [c async for c in manager.generate(REQUEST)]
        assert "".join(c.text for c in chunks) == reference
        assert {c.engine for c in chunks} == {"cpu"}
        assert manager.metrics().rerouted == 1


_SERVER = """
import asyncio, sys
from kensho.runtime.engines.llama_engine import LlamaCppEngine

async def main():
    engine = LlamaCppEngine(sys.argv[1], n_threads=1)
    await engine.load()
    print(engine.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_the_child_exits_when_the_server_is_killed() -> None:
    await child_exits_with_its_server(_SERVER, str(DEMO_MODEL_DIR / "model.gguf"))
