"""RuntimeManager: GPU -> CPU failover, mid-stream continuation, recovery, status events."""

from __future__ import annotations

import asyncio

import pytest

from _runtime_support import RuntimeRig
from kensho.errors import CircuitOpenError, EngineError, EngineUnavailableError
from kensho.events import (
    BreakerStateChanged,
    Event,
    FallbackActivated,
    PrimaryProbeFailed,
    PrimaryProbing,
    PrimaryRestored,
    RequestRerouted,
    RuntimeAvailable,
    RuntimeUnavailable,
)
from kensho.hub import EventHub
from kensho.runtime.breaker import FORCED_OPEN_RETRY_AFTER, BreakerState, CircuitBreaker
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines import (
    FaultyEngine,
    GenerationChunk,
    GenerationRequest,
    MockCPUEngine,
    MockGPUEngine,
)
from kensho.runtime.manager import RuntimeManager
from kensho.telemetry.testing import capture_logs

S = BreakerState


async def reference_text(prompt: str, max_tokens: int, seed: int | None = None) -> str:
    engine = FaultyEngine()
    await engine.load()
    request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, seed=seed)
    return "".join([c.text async for c in engine.generate(request)])


async def test_healthy_requests_go_to_the_gpu() -> None:
    rig = RuntimeRig()
    async with rig.runtime:
        text, engines = await rig.text(max_tokens=5)
    assert engines == {"gpu"}
    assert text == await reference_text("hello", 5)
    m = rig.runtime.metrics()
    assert (m.requests, m.served_by_primary, m.served_by_fallback) == (1, 1, 0)
    assert not m.degraded
    assert rig.events == []


async def test_failover_before_first_token_is_invisible_then_switches_to_cpu() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.gpu.force_failure()
    expected = await reference_text("hello", 5)
    for _ in range(3):
        text, engines = await rig.text()
        assert text == expected  # zero user-visible errors
        assert engines == {"cpu"}
    assert rig.runtime.primary_breaker.state is S.OPEN
    assert rig.runtime.degraded
    assert rig.runtime.active_engine is rig.cpu
    rerouted = [e for e in rig.events if isinstance(e, RequestRerouted)]
    assert len(rerouted) == 3
    assert "GPU failed before any token" in rerouted[0].message
    switched = [e for e in rig.events if isinstance(e, FallbackActivated)]
    assert [e.message for e in switched] == ["GPU failing, switched to CPU (degraded performance)"]
    # While open, requests go straight to the CPU: the GPU is not called any more.
    calls = rig.gpu.stats().calls
    await rig.text()
    assert rig.gpu.stats().calls == calls
    m = rig.runtime.metrics()
    assert (m.rerouted, m.served_by_fallback, m.failed) == (3, 4, 0)


async def test_gpu_is_tested_and_restored_by_itself() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.runtime.force_primary_failure(times=3)
    for _ in range(3):
        await rig.text()
    assert rig.runtime.primary_breaker.state is S.OPEN
    await rig.clock.advance(60)  # no traffic: the timer alone starts the test
    assert rig.status()[-1] == "testing GPU"
    assert rig.runtime.primary_breaker.state is S.HALF_OPEN
    _, engines = await rig.text()
    assert engines == {"gpu"}  # the probe request is served by the GPU
    _, engines = await rig.text()
    assert engines == {"gpu"}
    assert rig.runtime.primary_breaker.state is S.CLOSED
    assert rig.status()[-1] == "GPU restored"
    assert not rig.runtime.degraded
    # The third failure trips the breaker, then that request is rerouted too.
    kinds = [e.kind for e in rig.events if not isinstance(e, BreakerStateChanged)]
    assert kinds == [
        "runtime.request_rerouted",
        "runtime.request_rerouted",
        "runtime.fallback_activated",
        "runtime.request_rerouted",
        "runtime.primary_probing",
        "runtime.primary_restored",
    ]


async def test_failed_probe_stays_on_cpu_and_is_served_by_cpu() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.gpu.force_failure()
    for _ in range(3):
        await rig.text()
    await rig.clock.advance(60)
    text, engines = await rig.text()
    assert engines == {"cpu"}
    assert text == await reference_text("hello", 5)
    probe_failed = [e for e in rig.events if isinstance(e, PrimaryProbeFailed)]
    assert len(probe_failed) == 1
    assert probe_failed[0].message == "GPU still failing, staying on CPU; next test in 60 s"
    assert rig.runtime.primary_breaker.state is S.OPEN


async def test_mid_stream_failure_continues_on_cpu_with_the_same_text() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.gpu.force_failure(times=1, after_tokens=3)
    request = GenerationRequest(prompt="story", max_tokens=8, seed=3)
    chunks = await rig.collect(request)
    assert [c.engine for c in chunks] == ["gpu"] * 3 + ["cpu"] * 5
    assert [c.index for c in chunks] == list(range(8))
    assert "".join(c.text for c in chunks) == await reference_text("story", 8, seed=3)
    assert chunks[-1].finish_reason == "length"
    note = next(e for e in rig.events if isinstance(e, RequestRerouted))
    assert note.tokens_done == 3
    assert "after 3 tokens" in note.message
    m = rig.runtime.metrics()
    assert (m.continued_mid_stream, m.primary.failures, m.failed) == (1, 1, 0)


async def test_mid_stream_failure_without_continuation_ends_with_clear_error() -> None:
    rig = RuntimeRig(cpu_continues=False)
    await rig.runtime.start()
    rig.gpu.force_failure(times=1, after_tokens=2)
    got: list[GenerationChunk] = []

    async def go() -> None:
        async for chunk in rig.runtime.generate(GenerationRequest(prompt="x", max_tokens=6)):
            got.append(chunk)  # noqa: PERF401 - keeps what arrived before the error

    with pytest.raises(EngineError, match="cannot continue a stream; send the request again"):
        await rig.run(go())
    assert len(got) == 2
    assert rig.cpu.stats().calls == 0


async def test_fallback_failures_never_count_against_the_primary() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.runtime.force_primary_failure(times=3)
    for _ in range(3):
        await rig.text()
    primary_failures = rig.runtime.primary_breaker.metrics().failures
    rig.cpu.force_failure()
    for _ in range(2):
        with pytest.raises(EngineError, match=r"cpu|CPU"):
            await rig.text()
    assert rig.runtime.primary_breaker.metrics().failures == primary_failures
    assert rig.runtime.fallback_breaker is not None
    assert rig.runtime.fallback_breaker.metrics().failures == 2
    # The GPU's own recovery clock is untouched by the CPU's trouble.
    await rig.clock.advance(60)
    assert rig.runtime.primary_breaker.state is S.HALF_OPEN


async def test_both_failing_reports_both_with_retry_after() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.gpu.force_failure()
    rig.cpu.force_failure()
    with pytest.raises(EngineError) as info:
        await rig.text()
    message = str(info.value)
    assert "GPU failed" in message and "CPU (fallback) failed too" in message
    assert "retry in" in message
    for _ in range(2):
        with pytest.raises(EngineError):
            await rig.text()
    # Both breakers open now: refused at once, with the earliest retry-after.
    await rig.clock.advance(10)
    with pytest.raises(CircuitOpenError) as refused:
        await rig.text()
    assert refused.value.retry_after == pytest.approx(50, abs=1)
    assert "refusing calls too" in str(refused.value)
    unavailable = [e for e in rig.events if isinstance(e, RuntimeUnavailable)]
    assert len(unavailable) == 1
    assert "GPU and CPU both failing" in unavailable[0].message
    assert rig.runtime.metrics().rejected == 1


async def test_cpu_opening_first_then_gpu_says_no_engine_then_announces_the_cpu_back() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    assert rig.runtime.fallback_breaker is not None
    rig.runtime.fallback_breaker.trip("CPU crashed")  # the GPU serves: nothing to announce
    assert rig.status() == []
    rig.runtime.force_primary_failure()  # the GPU fails from now on
    for _ in range(3):
        with pytest.raises(CircuitOpenError, match="refusing calls too"):
            await rig.text()
    assert rig.runtime.primary_breaker.state is S.OPEN
    unavailable = [e for e in rig.events if isinstance(e, RuntimeUnavailable)]
    assert len(unavailable) == 1
    assert unavailable[0].message.startswith("no engine available (GPU and CPU both failing")
    assert unavailable[0].retry_after == pytest.approx(60, abs=0.5)  # the CPU's next probe
    assert not any(isinstance(e, FallbackActivated) for e in rig.events)  # not "switched to CPU"
    await rig.clock.advance(60)  # both test recovery; the GPU still fails, the CPU serves
    for _ in range(2):
        _, engines = await rig.text()
        assert engines == {"cpu"}
    assert rig.runtime.fallback_breaker.state is S.CLOSED
    states = [m for m in rig.status() if not m.startswith("request ")]
    assert states[1:3] == ["testing GPU", "GPU still failing, staying on CPU; next test in 60 s"]
    assert states[3:] == [
        "CPU recovered after 61 s with no engine: serving on CPU (degraded performance)"
    ]
    back = [e for e in rig.events if isinstance(e, RuntimeAvailable)]
    assert (back[0].engine, back[0].degraded) == ("CPU", True)
    assert back[0].unavailable_for == pytest.approx(60.5, abs=0.5)  # GPU opened at ~0.1 s


async def test_both_down_then_the_gpu_back_is_announced_as_restored_once() -> None:
    rig = RuntimeRig(fallback_breaker=None)
    await rig.runtime.start()
    assert rig.runtime.fallback_breaker is not None
    rig.runtime.primary_breaker.trip("GPU crashed")
    rig.runtime.fallback_breaker.trip("CPU crashed")
    assert rig.status() == [
        "GPU failing, switched to CPU (degraded performance)",
        "no engine available (GPU and CPU both failing (CPU crashed)); retry in 60 s",
    ]
    await rig.clock.advance(60)
    for _ in range(2):
        _, engines = await rig.text()
        assert engines == {"gpu"}
    assert rig.status()[-1] == "GPU restored"
    for _ in range(2):  # the CPU closes too, later: users were already told
        await rig.runtime.fallback_breaker.call(asyncio.sleep, 0)
    assert rig.runtime.fallback_breaker.state is S.CLOSED
    assert rig.status()[-1] == "GPU restored"
    assert not any(isinstance(e, RuntimeAvailable) for e in rig.events)


async def test_a_forced_open_gpu_does_not_shorten_the_cpus_retry_after() -> None:
    clock = VirtualClock()
    rig = RuntimeRig(
        clock=clock, fallback_breaker=CircuitBreaker("cpu", clock=clock, open_duration=120)
    )
    await rig.runtime.start()
    rig.runtime.primary_breaker.force_open("maintenance")  # no probe is ever due
    assert rig.runtime.fallback_breaker is not None
    rig.runtime.fallback_breaker.trip("CPU crashed")
    await rig.clock.advance(15)
    # The GPU's open_duration (60 s) says nothing: the CPU's next probe is in 105 s.
    assert rig.runtime.retry_after() == pytest.approx(105)
    with pytest.raises(CircuitOpenError) as refused:
        await rig.text()
    assert refused.value.retry_after == pytest.approx(105)
    rig.runtime.fallback_breaker.force_open("maintenance")
    assert rig.runtime.retry_after() == FORCED_OPEN_RETRY_AFTER  # nothing scheduled at all
    assert rig.runtime.retry_after() > 0  # /readyz stays "not ready"


async def test_gpu_dead_for_a_long_outage_is_still_served_by_the_cpu() -> None:
    clock = VirtualClock()
    breaker = CircuitBreaker(
        "gpu", clock=clock, open_duration=1, open_duration_multiplier=2, max_open_duration=600
    )
    rig = RuntimeRig(clock=clock, primary_breaker=breaker)
    gpu = rig.gpu
    await rig.runtime.start()
    for _ in range(1100):  # a week of failed probes, as trips
        breaker.trip("GPU lost")
    gpu.force_failure()
    await clock.advance(600)
    assert breaker.state is S.HALF_OPEN
    text, engines = await rig.text()  # this request carries the probe
    assert engines == {"cpu"}
    assert text == await reference_text("hello", 5)
    assert breaker.state is S.OPEN
    assert breaker.metrics().open_until == pytest.approx(600 + 600)  # failed at 600, capped


async def test_hung_gpu_is_detected_by_first_token_timeout() -> None:
    rig = RuntimeRig(first_token_timeout=2.0)
    await rig.runtime.start()
    rig.gpu.hang(times=1)
    request = GenerationRequest(prompt="hello", max_tokens=3)
    started = rig.clock.monotonic()
    chunks = await rig.collect(request)
    assert {c.engine for c in chunks} == {"cpu"}
    assert rig.clock.monotonic() - started >= 2.0
    m = rig.runtime.metrics().primary
    assert m.timeouts == 1
    assert m.last_failure is not None and "no first token within 2 s" in m.last_failure.message
    assert rig.gpu.stats().active == 0  # the hung call was cancelled


async def test_hung_gpu_mid_stream_is_detected_by_chunk_timeout() -> None:
    rig = RuntimeRig(chunk_timeout=1.0)
    await rig.runtime.start()
    rig.gpu.hang(times=1, after_tokens=2)
    chunks = await rig.collect(GenerationRequest(prompt="hello", max_tokens=4))
    assert [c.engine for c in chunks] == ["gpu", "gpu", "cpu", "cpu"]
    assert "no next token within 1 s" in str(rig.runtime.metrics().primary.last_failure)


async def test_half_open_probe_is_bounded_by_half_open_timeout() -> None:
    rig = RuntimeRig(first_token_timeout=30.0)
    await rig.runtime.start()
    rig.runtime.force_primary_failure(times=3)
    for _ in range(3):
        await rig.text()
    await rig.clock.advance(60)
    rig.gpu.hang(times=1)
    started = rig.clock.monotonic()
    _, engines = await rig.text()
    # 5 s half-open timeout, not the 30 s first-token timeout.
    assert rig.clock.monotonic() - started < 6.5
    assert engines == {"cpu"}
    assert rig.runtime.primary_breaker.state is S.OPEN
    assert rig.runtime.metrics().primary.timeouts == 1


async def test_half_open_lets_only_one_probe_through_others_use_cpu() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.runtime.force_primary_failure(times=3)
    for _ in range(3):
        await rig.text()
    await rig.clock.advance(60)

    async def one() -> set[str]:
        return {c.engine async for c in rig.runtime.generate(GenerationRequest(prompt="p"))}

    results = await rig.run(asyncio.gather(*(one() for _ in range(10))))
    assert results.count({"gpu"}) == 1
    assert results.count({"cpu"}) == 9
    assert rig.gpu.stats().peak_active == 1


async def test_start_without_gpu_starts_degraded_and_loads_gpu_when_testing() -> None:
    rig = RuntimeRig()
    rig.gpu.fail_load()
    await rig.runtime.start()
    assert rig.runtime.degraded
    assert rig.status() == ["GPU failing, switched to CPU (degraded performance)"]
    _, engines = await rig.text()
    assert engines == {"cpu"}
    rig.gpu.fail_load(False)
    await rig.clock.advance(60)
    for _ in range(2):
        _, engines = await rig.text()
        assert engines == {"gpu"}
    assert rig.status()[-1] == "GPU restored"


async def test_gpu_missing_on_this_machine_is_said_once_and_never_probed() -> None:
    rig = RuntimeRig()
    rig.gpu.fail_load(permanent=True)
    await rig.runtime.start()
    assert rig.status() == [
        "GPU unavailable on this machine, serving on CPU (degraded performance)"
    ]
    assert str(rig.runtime.primary_breaker.state) == "forced_open"
    await rig.clock.advance(3600)  # an hour later: no probe, no new failure
    for _ in range(3):
        _, engines = await rig.text()
        assert engines == {"cpu"}
    assert len(rig.status()) == 1
    assert rig.gpu.stats().calls == 0


async def test_no_engine_loads_is_a_clear_error() -> None:
    rig = RuntimeRig()
    rig.gpu.fail_load()
    rig.cpu.fail_load()
    with pytest.raises(EngineUnavailableError, match="no inference engine could start"):
        await rig.runtime.start()


async def test_consumer_stopping_early_releases_the_permit_and_the_engine() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()

    async def first_two() -> int:
        n = 0
        async with __import__("contextlib").aclosing(
            rig.runtime.generate(GenerationRequest(prompt="x", max_tokens=50))
        ) as stream:
            async for _ in stream:
                n += 1
                if n == 2:
                    break
        return n

    assert await rig.run(first_two()) == 2
    assert rig.gpu.stats().active == 0
    m = rig.runtime.metrics().primary
    assert (m.successes, m.failures) == (0, 0)


async def test_force_primary_failure_on_and_off() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.runtime.force_primary_failure()
    _, engines = await rig.text()
    assert engines == {"cpu"}
    rig.runtime.force_primary_failure(False)
    _, engines = await rig.text()
    assert engines == {"gpu"}
    with pytest.raises(ValueError, match="times"):
        rig.runtime.force_primary_failure(times=0)


async def test_bad_request_is_not_rerouted_nor_counted() -> None:
    class Picky(MockGPUEngine):
        async def generate(self, request: GenerationRequest):  # type: ignore[override]
            raise ValueError("prompt too long for this model")
            yield  # pragma: no cover

    clock = VirtualClock()
    rig = RuntimeRig(clock=clock, gpu=Picky(clock=clock))
    runtime, cpu = rig.runtime, rig.cpu
    await runtime.start()
    with pytest.raises(ValueError, match="too long"):
        _ = [c async for c in runtime.generate(GenerationRequest(prompt="x"))]
    assert cpu.stats().calls == 0
    assert runtime.metrics().primary.failures == 0


async def test_without_fallback_an_open_primary_refuses_with_retry_after() -> None:
    clock = VirtualClock()
    rig = RuntimeRig(
        clock=clock,
        fallback=False,
        primary_breaker=CircuitBreaker("gpu", clock=clock, failure_threshold=1),
    )
    runtime, gpu, seen = rig.runtime, rig.gpu, rig.events
    await runtime.start()
    gpu.force_failure()
    with pytest.raises(EngineError):
        _ = [c async for c in runtime.generate(GenerationRequest(prompt="x"))]
    await clock.advance(20)
    with pytest.raises(CircuitOpenError, match="no fallback engine") as info:
        _ = [c async for c in runtime.generate(GenerationRequest(prompt="x"))]
    assert info.value.retry_after == pytest.approx(40)
    assert any(isinstance(e, RuntimeUnavailable) for e in seen)
    runtime.primary_breaker.force_open("maintenance")
    with pytest.raises(CircuitOpenError, match="no fallback engine") as info:
        _ = [c async for c in runtime.generate(GenerationRequest(prompt="x"))]
    assert info.value.retry_after == FORCED_OPEN_RETRY_AFTER  # not open_duration (60 s)
    assert "until an operator resets one" in str(info.value)


async def test_status_stream_yields_readable_events() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    messages: list[str] = []

    async def watch() -> None:
        async for event in rig.runtime.events():
            if isinstance(event, FallbackActivated | PrimaryProbing | PrimaryRestored):
                messages.append(event.message)
            if isinstance(event, PrimaryRestored):
                return

    watcher = asyncio.create_task(watch())
    await rig.clock.settle()
    rig.runtime.force_primary_failure(times=3)
    with capture_logs() as logs:
        for _ in range(3):
            await rig.text()
        await rig.clock.advance(60)
        for _ in range(2):
            await rig.text()
    await watcher
    assert messages == [
        "GPU failing, switched to CPU (degraded performance)",
        "testing GPU",
        "GPU restored",
    ]
    assert rig.runtime.hub.subscribers == 0
    # The hub's log listener writes what the manager announces (service "events").
    event_logs = [e for e in logs if e["service"] == "events"]
    assert any(e["event"] == "GPU restored" for e in event_logs)
    assert any(e.get("status") == "runtime.fallback_activated" for e in event_logs)


async def test_manual_force_open_routes_to_cpu_and_reset_restores() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.runtime.primary_breaker.force_open("maintenance")
    _, engines = await rig.text()
    assert engines == {"cpu"}
    rig.runtime.primary_breaker.reset()
    _, engines = await rig.text()
    assert engines == {"gpu"}
    assert rig.status() == [
        "GPU failing, switched to CPU (degraded performance)",
        "GPU restored",
    ]


def test_fallback_must_differ_from_primary() -> None:
    gpu = MockGPUEngine()
    with pytest.raises(ValueError, match="different engine"):
        RuntimeManager(gpu, gpu)


async def test_built_from_settings() -> None:
    from kensho.config import load_settings

    settings = load_settings(
        env={"KENSHO_RUNTIME_FAILURE_THRESHOLD": "1", "KENSHO_RUNTIME_OPEN_DURATION": "5"}
    ).runtime
    clock = VirtualClock()
    gpu, cpu = MockGPUEngine(clock=clock), MockCPUEngine(clock=clock)
    runtime = RuntimeManager.from_settings(gpu, cpu, settings, clock=clock)
    assert runtime.primary_breaker.failure_threshold == 1
    assert runtime.fallback_breaker is not None
    assert runtime.fallback_breaker.open_duration == 5
    await runtime.start()
    runtime.force_primary_failure(times=1)
    task = asyncio.ensure_future(_drain(runtime, GenerationRequest(prompt="x", max_tokens=2)))
    await clock.advance(1)
    assert {c.engine for c in await task} == {"cpu"}
    assert runtime.primary_breaker.state is S.OPEN
    await clock.advance(5)
    assert runtime.primary_breaker.state is S.HALF_OPEN


async def _drain(runtime: RuntimeManager, request: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in runtime.generate(request)]


async def test_event_stream_drops_oldest_for_a_slow_subscriber_and_can_replay() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    stream = rig.runtime.events(buffer=2)
    first = asyncio.ensure_future(anext(stream))
    await rig.clock.settle()  # subscribed, waiting
    rig.runtime.primary_breaker.force_open("a")
    assert isinstance(await first, BreakerStateChanged)
    for reason in ("b", "c", "d"):
        rig.runtime.primary_breaker.reset()
        rig.runtime.primary_breaker.force_open(reason)
    kept = [await anext(stream), await anext(stream)]
    assert [type(e).__name__ for e in kept] == ["BreakerStateChanged", "FallbackActivated"]
    assert kept[1].message.startswith("GPU failing")
    with capture_logs() as logs:
        await stream.aclose()  # type: ignore[attr-defined]
    assert any(e["event"] == "slow event subscriber dropped events" for e in logs)
    replayed = rig.runtime.events(replay=True)
    assert isinstance(await anext(replayed), BreakerStateChanged)
    await replayed.aclose()  # type: ignore[attr-defined]
    assert rig.runtime.hub.subscribers == 0


async def test_a_failing_status_listener_is_logged_not_raised() -> None:
    rig = RuntimeRig()

    def broken(event: Event) -> None:
        raise RuntimeError("renderer bug")

    rig.runtime.add_listener(broken)
    with capture_logs() as logs:
        rig.runtime.primary_breaker.force_open()
    assert rig.runtime.degraded
    assert any(e["event"] == "event listener failed" for e in logs)
    rig.runtime.remove_listener(broken)


async def test_stopping_early_on_the_fallback_releases_its_permit_at_once() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.runtime.primary_breaker.force_open()
    stream = rig.runtime.generate(GenerationRequest(prompt="x", max_tokens=50))
    first = asyncio.ensure_future(anext(stream))
    await rig.clock.advance(0.3)
    assert (await first).engine == "cpu"
    assert rig.cpu.stats().active == 1
    await stream.aclose()  # type: ignore[attr-defined]
    assert rig.cpu.stats().active == 0
    assert rig.runtime.fallback_breaker is not None
    m = rig.runtime.fallback_breaker.metrics()
    assert (m.successes, m.failures, m.probes_in_flight) == (0, 0, 0)


async def test_slow_calls_are_judged_on_time_to_first_token_not_stream_length() -> None:
    clock = VirtualClock()
    breaker = CircuitBreaker("gpu", clock=clock, failure_threshold=1, slow_call_threshold=1.0)
    rig = RuntimeRig(clock=clock, primary_breaker=breaker)
    runtime, gpu = rig.runtime, rig.gpu
    await runtime.start()
    # 400 tokens at 10 ms: a 4 s answer, but the first token came after 50 ms.
    long = asyncio.ensure_future(_drain(runtime, GenerationRequest(prompt="x", max_tokens=400)))
    await clock.advance(5)
    assert len(await long) == 400
    assert breaker.state is S.CLOSED
    assert breaker.metrics().slow_calls == 0
    # A GPU that needs 2 s before its first token is slow, even for a 2-token answer.
    gpu.slow_down(40)
    short = asyncio.ensure_future(_drain(runtime, GenerationRequest(prompt="x", max_tokens=2)))
    await clock.advance(5)
    assert {c.engine for c in await short} == {"gpu"}  # served: slow is not an error
    assert breaker.metrics().slow_calls == 1
    assert breaker.state is S.OPEN


async def test_close_stops_the_breaker_timers() -> None:
    rig = RuntimeRig()
    await rig.runtime.start()
    rig.gpu.force_failure()
    for _ in range(3):
        await rig.text()
    assert str(rig.runtime.primary_breaker.state) == "open"
    before = len(rig.status())
    await rig.runtime.close()
    await rig.clock.advance(3600)  # the open period ends long after shutdown
    assert str(rig.runtime.primary_breaker.state) == "open"
    assert len(rig.status()) == before  # no "testing GPU" after close


async def test_breaker_transitions_reach_the_given_hub_as_the_breaker_made_them() -> None:
    hub = EventHub()
    rig = RuntimeRig(hub=hub)
    assert rig.runtime.hub is hub
    from_breaker: list[Event] = []
    rig.runtime.primary_breaker.add_listener(from_breaker.append)
    await rig.runtime.start()
    rig.gpu.force_failure()
    with capture_logs() as logs:
        for _ in range(3):
            await rig.text()
    changed = [e for e in hub.history if isinstance(e, BreakerStateChanged)]
    # The very event the breaker made, once: not a copy re-emitted by the manager.
    assert [id(e) for e in changed] == [id(e) for e in from_breaker]
    assert [e.to_state for e in changed] == ["open"]
    # The raw transition first (the executor re-plans on it), then what users are told.
    kinds = [e.kind for e in hub.history]
    assert kinds.index("breaker.state_changed") < kinds.index("runtime.fallback_activated")
    # Each announcement is logged once, by the hub's log listener.
    switched = [e for e in logs if e.get("status") == "runtime.fallback_activated"]
    assert [(e["service"], e["level"], e["event"]) for e in switched] == [
        ("events", "warning", "GPU failing, switched to CPU (degraded performance)")
    ]
    assert switched[0]["primary"] == "GPU"
    assert switched[0]["fallback"] == "CPU"
    rerouted = [e for e in logs if e.get("status") == "runtime.request_rerouted"]
    assert len(rerouted) == 3
    assert all(e["service"] == "events" for e in rerouted)


class _Steps(MockCPUEngine):
    """A mock engine whose load takes a few loop turns and notes when it began and ended."""

    def __init__(self, name: str, order: list[str]) -> None:
        super().__init__(name=name)
        self.order = order

    async def load(self) -> None:
        self.order.append(f"{self.name} begins")
        for _ in range(3):
            await asyncio.sleep(0)  # a turn of the loop, as a child's import would give
        await super().load()
        self.order.append(f"{self.name} ends")


async def test_both_engines_load_at_once_and_are_reported_in_order() -> None:
    # A child-process engine takes seconds to start: the fallback must not wait for it.
    order: list[str] = []
    manager = RuntimeManager(_Steps("gpu", order), _Steps("cpu", order), clock=VirtualClock())
    await manager.start()
    try:
        assert order[:2] == ["gpu begins", "cpu begins"]
        assert sorted(order[2:]) == ["cpu ends", "gpu ends"]
        assert not manager.degraded
    finally:
        await manager.close()
