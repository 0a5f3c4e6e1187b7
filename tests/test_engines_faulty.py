"""Fault-injecting engines and the request/chunk types, on virtual time."""

from __future__ import annotations

import asyncio

import pytest

from kensho.errors import EngineError, EngineOutOfMemoryError, EngineUnavailableError
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines import (
    ChatMessage,
    Engine,
    FaultyEngine,
    GenerationChunk,
    GenerationRequest,
    MockCPUEngine,
    MockGPUEngine,
    SupportsHealth,
)


async def collect(engine: FaultyEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


async def loaded(engine: FaultyEngine) -> FaultyEngine:
    await engine.load()
    return engine


async def run_timed(
    clock: VirtualClock, engine: FaultyEngine, request: GenerationRequest, step: float = 0.001
) -> list[tuple[float, GenerationChunk]]:
    """Collect chunks with the virtual time each arrived at."""
    out: list[tuple[float, GenerationChunk]] = []

    async def consume() -> None:
        async for chunk in engine.generate(request):
            out.append((clock.monotonic(), chunk))  # noqa: PERF401 - time of arrival matters

    task = asyncio.create_task(consume())
    while not task.done():
        await clock.advance(step)
    await task
    return out


# -- request and chunk types ----------------------------------------------------------


def test_request_needs_exactly_one_of_prompt_and_messages() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest(prompt="hi", messages=(ChatMessage("user", "hi"),))
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationRequest(prompt="hi", max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationRequest(prompt="hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        GenerationRequest(prompt="hi", top_p=0)


def test_chat_request_and_continued_request() -> None:
    request = GenerationRequest.chat([("system", "be brief"), ("user", "hello")], max_tokens=10)
    assert request.text_input == "system: be brief\nuser: hello"
    assert request.request_id.startswith("req-")
    later = request.continued("the model ", 2)
    assert later.continuation == "the model "
    assert later.max_tokens == 8
    assert later.request_id == request.request_id
    assert later.continued("runs ", 1).continuation == "the model runs "


def test_engines_satisfy_the_protocols() -> None:
    gpu = MockGPUEngine()
    assert isinstance(gpu, Engine)
    assert isinstance(gpu, SupportsHealth)
    assert (gpu.name, gpu.kind) == ("gpu", "gpu")
    cpu = MockCPUEngine()
    assert (cpu.name, cpu.kind) == ("cpu", "cpu")


# -- normal streaming --------------------------------------------------------------------


async def test_streams_max_tokens_with_configured_timing() -> None:
    clock = VirtualClock()
    engine = await loaded(MockGPUEngine(clock=clock))
    timed = await run_timed(clock, engine, GenerationRequest(prompt="hi", max_tokens=4))
    times = [round(t, 3) for t, _ in timed]
    assert times == [0.05, 0.06, 0.07, 0.08]
    chunks = [c for _, c in timed]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert all(c.engine == "gpu" for c in chunks)


async def test_cpu_preset_is_five_times_slower() -> None:
    clock = VirtualClock()
    gpu = await loaded(MockGPUEngine(clock=clock))
    cpu = await loaded(MockCPUEngine(clock=clock))
    request = GenerationRequest(prompt="hi", max_tokens=5)
    gpu_end = (await run_timed(clock, gpu, request))[-1][0]
    start = clock.monotonic()
    cpu_end = (await run_timed(clock, cpu, request))[-1][0] - start
    assert cpu_end / gpu_end == pytest.approx(5, rel=0.05)


async def test_text_is_deterministic_and_continuation_resumes_exactly() -> None:
    gpu = await loaded(FaultyEngine("a"))
    cpu = await loaded(FaultyEngine("b"))
    request = GenerationRequest(prompt="tell me", max_tokens=8, seed=7)
    full = "".join(c.text for c in await collect(gpu, request))
    head = await collect(gpu, GenerationRequest(prompt="tell me", max_tokens=3, seed=7))
    produced = "".join(c.text for c in head)
    tail = await collect(cpu, request.continued(produced, 3))
    assert [c.index for c in tail] == [3, 4, 5, 6, 7]
    assert produced + "".join(c.text for c in tail) == full
    other_seed = await collect(gpu, GenerationRequest(prompt="tell me", max_tokens=8, seed=8))
    assert "".join(c.text for c in other_seed) != full


async def test_stop_sequence_ends_the_stream() -> None:
    engine = await loaded(FaultyEngine())
    request = GenerationRequest(prompt="x", max_tokens=50)
    words = [c.text for c in await collect(engine, request)]
    stop = words[3].strip()
    first = next(i for i, w in enumerate(words) if w.strip() == stop)
    chunks = await collect(engine, GenerationRequest(prompt="x", max_tokens=50, stop=(stop,)))
    assert len(chunks) == first + 1
    assert chunks[-1].finish_reason == "stop"


async def test_not_loaded_and_load_failure_are_unavailable_errors() -> None:
    engine = FaultyEngine("gpu0")
    with pytest.raises(EngineUnavailableError, match="not loaded"):
        await collect(engine, GenerationRequest(prompt="x"))
    engine.fail_load()
    with pytest.raises(EngineUnavailableError, match="cannot load"):
        await engine.load()
    assert not await engine.health()
    engine.fail_load(False)
    await engine.load()
    assert await engine.health()
    await engine.close()
    assert not engine.loaded


# -- failure modes -----------------------------------------------------------------------


async def test_force_failure_before_first_token_until_turned_off() -> None:
    engine = await loaded(FaultyEngine("gpu0", "gpu"))
    engine.force_failure()
    assert not await engine.health()
    for _ in range(3):
        with pytest.raises(EngineError, match="failed before the first token"):
            await collect(engine, GenerationRequest(prompt="x"))
    engine.force_failure(False)
    assert len(await collect(engine, GenerationRequest(prompt="x", max_tokens=2))) == 2
    assert engine.stats().failures == 3


async def test_force_failure_n_times_then_healthy() -> None:
    engine = await loaded(FaultyEngine())
    engine.force_failure(times=2)
    outcomes = []
    for _ in range(4):
        try:
            await collect(engine, GenerationRequest(prompt="x", max_tokens=1))
            outcomes.append("ok")
        except EngineError:
            outcomes.append("fail")
    assert outcomes == ["fail", "fail", "ok", "ok"]


async def test_fail_after_k_tokens_delivers_k_tokens_first() -> None:
    engine = await loaded(FaultyEngine())
    engine.force_failure(after_tokens=3)
    got: list[GenerationChunk] = []
    with pytest.raises(EngineError, match="after 3 tokens"):
        async for chunk in engine.generate(GenerationRequest(prompt="x", max_tokens=10)):
            got.append(chunk)  # noqa: PERF401 - keeps what arrived before the error
    assert len(got) == 3


async def test_custom_error_type() -> None:
    engine = await loaded(FaultyEngine())
    engine.force_failure(error=EngineOutOfMemoryError("CUDA out of memory"))
    with pytest.raises(EngineOutOfMemoryError):
        await collect(engine, GenerationRequest(prompt="x"))


async def test_hang_never_produces_and_is_cancellable() -> None:
    clock = VirtualClock()
    engine = await loaded(MockGPUEngine(clock=clock))
    engine.hang()
    got: list[GenerationChunk] = []

    async def consume() -> None:
        async for chunk in engine.generate(GenerationRequest(prompt="x")):
            got.append(chunk)  # noqa: PERF401 - observed while still running

    task = asyncio.create_task(consume())
    await clock.advance(3600)
    assert got == []
    assert not task.done()
    assert engine.stats().active == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().active == 0
    assert engine.stats().hangs == 1


async def test_slow_down_multiplies_latency() -> None:
    clock = VirtualClock()
    engine = await loaded(MockGPUEngine(clock=clock))
    engine.slow_down(10)
    timed = await run_timed(clock, engine, GenerationRequest(prompt="x", max_tokens=2), 0.01)
    assert [round(t, 2) for t, _ in timed] == [0.5, 0.6]
    engine.heal()
    assert not engine.faulty


async def test_failure_probability_is_reproducible_with_a_seed() -> None:
    async def pattern(seed: int) -> list[bool]:
        engine = await loaded(FaultyEngine(seed=seed))
        engine.set_failure_probability(0.3)
        result = []
        for _ in range(200):
            try:
                await collect(engine, GenerationRequest(prompt="x", max_tokens=1))
                result.append(True)
            except EngineError:
                result.append(False)
        return result

    first = await pattern(42)
    assert first == await pattern(42)
    failures = first.count(False)
    assert 40 <= failures <= 80  # about 30 % of 200
    assert first != await pattern(43)


async def test_concurrent_streams_are_counted() -> None:
    clock = VirtualClock()
    engine = await loaded(MockCPUEngine(clock=clock))

    async def one() -> int:
        return len(await collect(engine, GenerationRequest(prompt="x", max_tokens=3)))

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await clock.advance(1)
    assert [await t for t in tasks] == [3] * 5
    stats = engine.stats()
    assert stats.peak_active == 5
    assert stats.active == 0
    assert stats.completed == 5
    assert stats.tokens == 15


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e: e.force_failure(times=0), "times"),
        (lambda e: e.hang(after_tokens=-1), "after_tokens"),
        (lambda e: e.slow_down(0), "factor"),
        (lambda e: e.set_failure_probability(2), "p must"),
        (lambda e: FaultyEngine(time_per_token=-1), "latencies"),
    ],
)
def test_invalid_fault_settings(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(FaultyEngine())  # type: ignore[operator]
