"""TaskExecutor: priorities, shedding, rejection, deadlines, cancellation, dynamic capacity."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from _runtime_support import ExecutorRig
from kensho.errors import EngineError, QueueFullError, TaskTimeoutError
from kensho.events import QueueCapacityChanged, RuntimeOverloaded, RuntimeRecovered
from kensho.hub import EventHub
from kensho.runtime.breaker import BreakerState
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines import (
    GenerationChunk,
    GenerationRequest,
    MockGPUEngine,
)
from kensho.runtime.engines.base import TokenLogprob, merge_chunks
from kensho.runtime.executor import Priority, TaskExecutor, TaskHandle, TaskOutcome, TaskState
from kensho.runtime.manager import RuntimeManager
from kensho.runtime.task import ChunkChannel
from kensho.telemetry.testing import capture_logs

P = Priority
Out = TaskOutcome


async def test_runs_a_task_and_streams_its_chunks() -> None:
    async with ExecutorRig() as rig:
        handle = rig.submit(tokens=4)
        reader = asyncio.create_task(handle.result())
        await rig.clock.advance(1)
        text = await reader
        assert len(text.split()) == 4
        assert handle.outcome is Out.COMPLETED
        assert handle.state is TaskState.DONE
        assert handle.engine == "gpu"
        assert await handle.wait() is Out.COMPLETED


async def test_priority_order_and_fifo_within_a_level() -> None:
    async with ExecutorRig() as rig:
        blocker = rig.submit(P.LOW)
        handles = {
            "low": rig.submit(P.LOW),
            "normal1": rig.submit(P.NORMAL),
            "critical": rig.submit(P.CRITICAL),
            "high": rig.submit(P.HIGH),
            "normal2": rig.submit(P.NORMAL),
        }
        assert blocker.state is TaskState.RUNNING
        assert rig.executor.statistics().queued == {
            "LOW": 1,
            "NORMAL": 2,
            "HIGH": 1,
            "CRITICAL": 1,
        }
        await rig.finish_all()
        order = sorted(handles, key=lambda k: handles[k].start_order or 0)
        assert order == ["critical", "high", "normal1", "normal2", "low"]
        assert all(h.outcome is Out.COMPLETED for h in handles.values())


async def test_full_queue_sheds_the_newest_lowest_task_for_a_higher_one() -> None:
    async with ExecutorRig(max_queue_size=3) as rig:
        rig.submit(P.NORMAL)  # running
        low1 = rig.submit(P.LOW)
        low2 = rig.submit(P.LOW)
        normal = rig.submit(P.NORMAL)
        high = rig.submit(P.HIGH)
        assert low2.outcome is Out.SHED
        assert low1.state is TaskState.QUEUED
        with pytest.raises(QueueFullError) as info:
            await low2.result()
        assert info.value.reason == "shed"
        assert info.value.retry_after > 0
        assert f"task {low2.id} (LOW) was shed" in str(info.value)
        assert "HIGH task" in str(info.value)
        assert rig.executor.statistics().shed == 1
        await rig.finish_all()
        assert high.start_order is not None and normal.start_order is not None
        assert high.start_order < normal.start_order


async def test_full_queue_rejects_a_task_that_does_not_outrank_anything() -> None:
    async with ExecutorRig(max_queue_size=2) as rig:
        rig.submit(P.NORMAL)
        queued = [rig.submit(P.NORMAL), rig.submit(P.NORMAL)]
        for priority in (P.NORMAL, P.LOW):
            with pytest.raises(QueueFullError) as info:
                rig.submit(priority)
            assert info.value.reason == "rejected"
            assert info.value.retry_after > 0
            assert "queue is full (2 tasks waiting, capacity 2)" in str(info.value)
        assert all(h.state is TaskState.QUEUED for h in queued)
        stats = rig.executor.statistics()
        assert (stats.rejected, stats.shed, stats.accepted) == (2, 0, 3)


async def test_queue_wait_deadline_times_out_a_task_that_never_started() -> None:
    async with ExecutorRig() as rig:
        rig.gpu.slow_down(1000)
        rig.submit()
        waiting = rig.submit(queue_timeout=5)
        await rig.clock.advance(4.9)
        assert waiting.state is TaskState.QUEUED
        await rig.clock.advance(0.1)
        assert waiting.outcome is Out.TIMED_OUT
        with pytest.raises(TaskTimeoutError) as info:
            await waiting.result()
        assert info.value.phase == "queue"
        assert "waited 5 s in the queue" in str(info.value)
        assert rig.executor.statistics().queued_total == 0


async def test_total_deadline_cancels_a_running_task_and_frees_its_slot() -> None:
    async with ExecutorRig() as rig:
        rig.gpu.slow_down(1000)
        slow = rig.submit(deadline=2)
        nxt = rig.submit()
        await rig.clock.advance(2)
        assert slow.outcome is Out.TIMED_OUT
        assert isinstance(slow.error, TaskTimeoutError)
        assert slow.error.phase == "total"
        await rig.clock.settle()
        assert rig.gpu.stats().active == 1  # the slot went to the next task
        assert nxt.state is TaskState.RUNNING


async def test_cancel_queued_and_running_tasks() -> None:
    async with ExecutorRig() as rig:
        rig.gpu.slow_down(1000)
        running = rig.submit()
        queued = rig.submit()
        await rig.clock.settle()
        assert queued.cancel()
        assert queued.outcome is Out.CANCELLED
        assert running.cancel("user pressed stop")
        await rig.clock.settle()
        assert running.outcome is Out.CANCELLED
        assert not running.cancel()  # already ended
        with pytest.raises(asyncio.CancelledError, match="user pressed stop"):
            await running.result()
        assert rig.gpu.stats().active == 0
        assert rig.executor.statistics().cancelled == 2
        m = rig.runtime.metrics().primary
        assert (m.failures, m.successes) == (0, 0)  # cancelling is not an engine fault


async def test_a_consumer_leaving_early_cancels_its_task_and_frees_the_slot() -> None:
    async with ExecutorRig() as rig:
        first = rig.submit(tokens=50)
        second = rig.submit(tokens=2)

        async def read_two() -> int:
            n = 0
            async with first:
                async for _ in first:
                    n += 1
                    if n == 2:
                        break
            return n

        reader = asyncio.create_task(read_two())
        await rig.clock.advance(0.2)
        assert await reader == 2
        assert first.outcome is Out.CANCELLED
        await rig.clock.advance(1)
        assert second.outcome is Out.COMPLETED


async def test_a_consumer_that_stops_reading_is_timed_out() -> None:
    async with ExecutorRig(stream_buffer=2, consumer_timeout=5) as rig:
        rig.gpu.slow_down(0.001)
        stalled = rig.submit(tokens=20)
        other = rig.submit(tokens=1)
        await rig.clock.advance(4)
        assert stalled.state is TaskState.RUNNING
        await rig.clock.advance(1.5)
        assert stalled.outcome is Out.CANCELLED
        assert "no chunk was read for 5 s" in str(stalled.error)
        await rig.clock.advance(1)
        assert other.outcome is Out.COMPLETED


async def test_engine_failures_reach_the_submitter() -> None:
    async with ExecutorRig() as rig:
        rig.gpu.force_failure()
        rig.cpu.force_failure()
        handle = rig.submit()
        await rig.clock.advance(1)
        assert handle.outcome is Out.FAILED
        with pytest.raises(EngineError, match="fallback"):
            await handle.result()
        assert rig.executor.statistics().failed == 1


async def test_gpu_failures_are_absorbed_by_failover() -> None:
    async with ExecutorRig() as rig:
        rig.runtime.force_primary_failure(times=3)
        handles = [rig.submit() for _ in range(6)]
        await rig.finish_all()
        assert all(h.outcome is Out.COMPLETED for h in handles)
        assert rig.runtime.primary_breaker.state is BreakerState.OPEN


async def test_concurrency_limit_per_engine() -> None:
    async with ExecutorRig(concurrency={"gpu": 3, "cpu": 1}) as rig:
        for _ in range(8):
            rig.submit()
        await rig.clock.settle()
        assert rig.executor.statistics().in_flight == {"gpu": 3}
        await rig.finish_all()
        assert rig.gpu.stats().peak_active == 3
        rig.runtime.primary_breaker.force_open()
        for _ in range(4):
            rig.submit()
        await rig.clock.settle()
        assert rig.executor.statistics().in_flight == {"cpu": 1}
        await rig.finish_all()
        assert rig.cpu.stats().peak_active == 1


async def test_an_engine_declared_limit_caps_the_configured_concurrency() -> None:
    """llama.cpp runs one sequence at a time: settings asking for 4 slots get 1."""
    async with ExecutorRig(concurrency={"gpu": 4, "cpu": 1}) as rig:
        rig.gpu.max_concurrency = 1  # type: ignore[attr-defined]
        for _ in range(5):
            rig.submit()
        await rig.clock.settle()
        assert rig.executor.statistics().in_flight == {"gpu": 1}
        await rig.finish_all()
        assert rig.gpu.stats().peak_active == 1


async def test_capacity_shrinks_on_the_slow_engine_and_grows_back() -> None:
    async with ExecutorRig(
        max_queue_size=100, max_queue_wait=10, concurrency={"gpu": 4, "cpu": 1}
    ) as rig:
        rig.runtime.primary_breaker.force_open("GPU lost")
        assert rig.executor.capacity() == 100  # nothing measured on the CPU yet
        for _ in range(3):
            rig.submit()
        await rig.finish_all()
        # A 5-token CPU task takes 0.25 + 4 * 0.05 = 0.45 s: 1 slot drains 22 in 10 s.
        assert rig.executor.capacity() == 22
        changed = [e for e in rig.events if isinstance(e, QueueCapacityChanged)]
        assert changed[-1].capacity == 22
        assert "cpu can drain about 22 tasks within 10 s" in changed[-1].message
        rig.cpu.slow_down(1000)  # keep the queue from draining while we fill it
        accepted = 0
        with pytest.raises(QueueFullError, match="reduced from 100 while on cpu"):
            for _ in range(100):
                rig.submit()
                accepted += 1
        assert accepted == 23  # 1 running + 22 queued
        rig.runtime.primary_breaker.reset()
        assert rig.executor.capacity() == 100
        changed = [e for e in rig.events if isinstance(e, QueueCapacityChanged)]
        assert changed[-1].message == "queue capacity 22 -> 100 (back to full capacity)"


async def test_sustained_rejection_hard_opens_for_critical_only_then_recovers() -> None:
    async with ExecutorRig(
        max_queue_size=1, rejection_threshold=3, rejection_window=10, hard_open_duration=30
    ) as rig:
        rig.runtime.primary_breaker.force_open("GPU lost")  # degraded, on the CPU
        rig.cpu.slow_down(100)
        rig.submit()
        rig.submit()
        cpu_calls = rig.cpu.stats().calls
        for _ in range(3):
            with pytest.raises(QueueFullError, match="queue is full"):
                rig.submit()
        overloaded = [e for e in rig.events if isinstance(e, RuntimeOverloaded)]
        assert len(overloaded) == 1
        assert overloaded[0].message == (
            "overloaded (3 rejections within 10 s): only critical tasks accepted until the "
            "queue drains (about 1.0 s, at most 30 s)"
        )
        assert rig.executor.overloaded
        with pytest.raises(QueueFullError) as info:
            rig.submit(P.HIGH)
        assert info.value.reason == "overloaded"
        # Nothing has completed on the CPU yet: 1 task ahead at the 1 s prior, 1 slot.
        assert info.value.retry_after == 1.0
        critical = rig.submit(P.CRITICAL)  # sheds the queued NORMAL task
        assert critical.state is TaskState.QUEUED
        # Hard open re-routes nothing: the GPU is not touched, routing is unchanged.
        assert rig.gpu.stats().calls == 0
        assert rig.runtime.primary_breaker.state is BreakerState.FORCED_OPEN
        assert rig.cpu.stats().calls == cpu_calls
        # The CPU (slowed 100x) finishes nothing in 30 s: the upper bound ends it.
        await rig.clock.advance(29.9)
        assert rig.executor.overloaded
        await rig.clock.advance(0.1)
        assert not rig.executor.overloaded
        assert isinstance(rig.events[-1], RuntimeRecovered)
        assert rig.events[-1].message == (
            "recovered after 30 s overloaded (upper bound of 30 s reached): "
            "accepting all tasks again"
        )


async def test_hard_open_ends_as_soon_as_the_queue_drains_with_honest_retry_after() -> None:
    async with ExecutorRig(
        max_queue_size=2, rejection_threshold=3, rejection_window=10, hard_open_duration=600
    ) as rig:
        warm = rig.submit()  # measures the GPU: 0.05 s + 4 * 0.01 s per 5-token task
        await rig.finish_all()
        assert warm.outcome is Out.COMPLETED
        start = rig.clock.monotonic()
        burst = [rig.submit() for _ in range(3)]  # 1 running, 2 queued: the queue is full
        for _ in range(3):
            with pytest.raises(QueueFullError) as rejected:
                rig.submit()
        # Admitted once the 2 queued tasks and this one's turn have started: 3 x 0.09 s.
        assert rejected.value.retry_after == pytest.approx(0.27)
        assert rig.executor.overloaded
        overloaded = next(e for e in rig.events if isinstance(e, RuntimeOverloaded))
        assert overloaded.max_duration == 600
        with pytest.raises(QueueFullError) as refused:
            rig.submit(P.HIGH)
        assert refused.value.reason == "overloaded"
        # Below the low-water mark (1 of 2) after 2 more finished tasks: 0.18 s, not 600.
        assert refused.value.retry_after == pytest.approx(0.18)
        assert overloaded.retry_after == pytest.approx(0.18)
        await rig.clock.advance(0.1)  # one finished: 1 still queued, not below the mark
        assert rig.executor.overloaded
        await rig.clock.advance(0.1)
        assert not rig.executor.overloaded
        recovered = [e for e in rig.events if isinstance(e, RuntimeRecovered)]
        assert len(recovered) == 1
        assert recovered[0].overloaded_for == pytest.approx(0.18)
        assert recovered[0].message == (
            "recovered after 0.2 s overloaded (queue down to 0 (low-water mark 1) and tasks "
            "finishing): accepting all tasks again"
        )
        assert rig.clock.monotonic() - start < 600
        late = rig.submit()  # admitted at once: no lock-out while idle
        await rig.finish_all()
        assert late.outcome is Out.COMPLETED
        assert all(h.outcome is Out.COMPLETED for h in burst)


async def test_hard_open_holds_while_the_engine_does_not_keep_up() -> None:
    async with ExecutorRig(
        max_queue_size=2, rejection_threshold=3, rejection_window=10, hard_open_duration=600
    ) as rig:
        rig.gpu.slow_down(100)  # a 5-token task now takes 9 s
        running = rig.submit()
        queued = [rig.submit(queue_timeout=1) for _ in range(2)]
        for _ in range(3):
            with pytest.raises(QueueFullError):
                rig.submit()
        assert rig.executor.overloaded
        await rig.clock.advance(5)
        # The queue emptied by expiry, not by service: the pressure has not ended.
        assert all(h.outcome is Out.TIMED_OUT for h in queued)
        assert rig.executor.statistics().queued_total == 0
        assert rig.executor.overloaded
        await rig.clock.advance(4)  # the running task finishes: the engine keeps up
        assert running.outcome is Out.COMPLETED
        assert not rig.executor.overloaded


async def test_statistics_snapshot_and_wait_percentiles() -> None:
    async with ExecutorRig() as rig:
        handles = [rig.submit(tokens=1) for _ in range(4)]
        await rig.finish_all()
        stats = rig.executor.statistics()
        assert (stats.accepted, stats.completed, stats.in_flight_total) == (4, 4, 0)
        # 1 token on the GPU = 0.05 s each, served one at a time.
        assert stats.wait_p50 == pytest.approx(0.05)
        assert stats.wait_p99 == pytest.approx(0.15)
        assert stats.capacity == 10
        assert all(h.done for h in handles)


async def test_aclose_cancels_everything_and_refuses_new_work() -> None:
    rig = ExecutorRig()
    await rig.runtime.start()
    handles = [rig.submit() for _ in range(3)]
    await rig.executor.aclose()
    assert all(h.outcome is Out.CANCELLED for h in handles)
    with pytest.raises(RuntimeError, match="closed"):
        rig.submit()


async def test_join_waits_for_all_tasks() -> None:
    async with ExecutorRig() as rig:
        handles = [rig.submit(tokens=2) for _ in range(3)]
        joiner = asyncio.create_task(rig.executor.join())
        await rig.clock.advance(1)
        await joiner
        assert all(h.outcome is Out.COMPLETED for h in handles)


async def test_rejections_and_sheds_are_logged_by_the_executor() -> None:
    async with ExecutorRig(max_queue_size=1) as rig:
        with capture_logs() as logs:
            rig.submit(P.LOW)
            rig.submit(P.LOW)
            rig.submit(P.HIGH)
            with pytest.raises(QueueFullError):
                rig.submit(P.LOW)
        mine = [e for e in logs if e["service"] == "runtime.executor"]
        assert [e["event"] for e in mine] == ["task ended", "task rejected"]
        assert mine[0]["outcome"] == "shed"


def test_invalid_settings_are_refused() -> None:
    runtime = RuntimeManager(MockGPUEngine())
    with pytest.raises(ValueError, match="min_queue_size"):
        TaskExecutor(runtime, max_queue_size=0)
    with pytest.raises(ValueError, match="concurrency"):
        TaskExecutor(runtime, concurrency={"gpu": 0})
    with pytest.raises(ValueError, match="rejection_threshold"):
        TaskExecutor(runtime, rejection_threshold=0)
    with pytest.raises(ValueError, match="stream_buffer"):
        TaskExecutor(runtime, stream_buffer=0)
    with pytest.raises(ValueError, match="hard_open_low_water"):
        TaskExecutor(runtime, hard_open_low_water=0)


# -- Hypothesis: every accepted task ends exactly once, in priority order ---------------


class ExecutorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        rig = ExecutorRig(
            max_queue_size=4,
            max_queue_wait=3.0,
            rejection_threshold=4,
            rejection_window=2,
            hard_open_duration=3,
        )
        self.clock, self.gpu, self.runtime, self.executor = (
            rig.clock,
            rig.gpu,
            rig.runtime,
            rig.executor,
        )
        self.loop.run_until_complete(self.runtime.start())
        self.accepted: list[TaskHandle] = []
        self.endings: dict[str, int] = {}
        original = self.executor._finish

        def counting(handle: TaskHandle, outcome: TaskOutcome, error: Any) -> bool:
            ended = original(handle, outcome, error)
            if ended:
                self.endings[handle.id] = self.endings.get(handle.id, 0) + 1
            return ended

        self.executor._finish = counting  # type: ignore[method-assign]

    def teardown(self) -> None:
        try:
            # Liveness: with time, every accepted task ends (no task is ever stranded).
            self.loop.run_until_complete(self.clock.advance(20))
            for handle in self.accepted:
                assert handle.done, f"{handle} never ended"
                assert self.endings.get(handle.id) == 1
            assert self.executor.statistics().in_flight_total == 0
        finally:
            self.loop.run_until_complete(self.executor.aclose())
            self.loop.close()

    @rule(
        priority=st.sampled_from(list(Priority)),
        tokens=st.integers(1, 4),
        deadline=st.none() | st.sampled_from([0.2, 1.0]),
    )
    def submit(self, priority: Priority, tokens: int, deadline: float | None) -> None:
        async def go() -> None:
            try:
                handle = self.executor.submit(
                    GenerationRequest(prompt="p", max_tokens=tokens),
                    priority=priority,
                    deadline=deadline,
                )
            except QueueFullError:
                return
            self.accepted.append(handle)

        self.loop.run_until_complete(go())

    @precondition(lambda self: bool(self.accepted))
    @rule(index=st.integers(min_value=0))
    def cancel(self, index: int) -> None:
        handle = self.accepted[index % len(self.accepted)]

        async def go() -> None:
            handle.cancel()
            await self.clock.settle()

        self.loop.run_until_complete(go())

    @rule(seconds=st.sampled_from([0.01, 0.1, 0.5, 2.0]))
    def advance(self, seconds: float) -> None:
        self.loop.run_until_complete(self.clock.advance(seconds))

    @rule(on=st.booleans())
    def gpu_trouble(self, on: bool) -> None:
        self.gpu.force_failure(on)

    @rule(action=st.sampled_from(["force_open", "reset"]), inside=st.booleans())
    def routing(self, action: str, inside: bool) -> None:
        """Switch routing under the executor's feet (degraded <-> normal), from inside
        the loop (as the breaker's timer does) or from plain code outside it."""
        switch = getattr(self.runtime.primary_breaker, action)
        if inside:

            async def go() -> None:
                switch()

            self.loop.run_until_complete(go())
        else:
            switch()
        self.loop.run_until_complete(self.clock.settle())

    @invariant()
    def each_task_ends_at_most_once_and_counts_add_up(self) -> None:
        assert all(n == 1 for n in self.endings.values())
        stats = self.executor.statistics()
        ended = stats.completed + stats.failed + stats.cancelled + stats.timed_out + stats.shed
        assert stats.accepted == len(self.accepted)
        assert ended == sum(1 for h in self.accepted if h.done)
        assert stats.queued_total == sum(1 for h in self.accepted if h.state is TaskState.QUEUED)
        # One slot per engine (a CPU task may still run when routing returns to the GPU).
        assert all(n <= 1 for n in stats.in_flight.values())
        if self.runtime.degraded and stats.in_flight.get("gpu", 0) == 0:
            assert stats.in_flight_total <= 1

    @invariant()
    def tasks_start_in_priority_order(self) -> None:
        for a in self.accepted:
            if a.start_order is None:
                continue
            for b in self.accepted:
                waiting_when_a_started = (
                    b is not a
                    and b.submit_order < a.start_order
                    and (b.start_order is None or b.start_order > a.start_order)
                    and (b.end_order is None or b.end_order > a.start_order)
                )
                if waiting_when_a_started:
                    assert (a.priority, -a.submit_order) > (b.priority, -b.submit_order), (
                        f"{a} started while {b} was waiting"
                    )


TestExecutorMachine = ExecutorMachine.TestCase
TestExecutorMachine.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


async def test_built_from_settings() -> None:
    from kensho.config import load_settings

    env = {"KENSHO_RUNTIME_MAX_QUEUE_SIZE": "7", "KENSHO_RUNTIME_HARD_OPEN_LOW_WATER": "0.25"}
    settings = load_settings(env=env).runtime
    runtime = RuntimeManager(MockGPUEngine(clock=VirtualClock()))
    executor = TaskExecutor.from_settings(runtime, settings, clock=VirtualClock())
    assert executor.max_queue_size == 7
    assert executor.concurrency == {"gpu": 4, "cpu": 1}
    assert executor.hard_open_duration == 30
    assert executor.hard_open_low_water == 0.25


async def test_half_open_probe_through_the_executor_is_bounded_and_served() -> None:
    async with ExecutorRig(concurrency={"gpu": 1, "cpu": 1}) as rig:
        rig.runtime.force_primary_failure(times=3)
        for _ in range(3):
            rig.submit()
        await rig.finish_all()
        assert rig.runtime.primary_breaker.state is BreakerState.OPEN
        await rig.clock.advance(60)
        rig.gpu.hang(times=1)
        probe = rig.submit()
        started = rig.clock.monotonic()
        await rig.finish_all()
        # The hung GPU probe was abandoned after the 5 s half-open timeout and the task
        # completed on the CPU: the submitter saw no error.
        assert probe.outcome is Out.COMPLETED
        assert rig.clock.monotonic() - started <= 6.5
        assert rig.runtime.primary_breaker.state is BreakerState.OPEN
        assert rig.runtime.metrics().primary.timeouts == 1


async def test_a_queue_timeout_may_only_lower_the_executor_bound() -> None:
    async with ExecutorRig(max_queue_wait=5) as rig:
        rig.gpu.slow_down(1000)
        rig.submit()
        patient = rig.submit(queue_timeout=100)
        hasty = rig.submit(queue_timeout=1)
        await rig.clock.advance(1)
        assert hasty.outcome is Out.TIMED_OUT
        assert patient.state is TaskState.QUEUED
        await rig.clock.advance(4)
        assert patient.outcome is Out.TIMED_OUT  # capped at max_queue_wait


def test_routing_change_from_outside_the_loop_still_dispatches() -> None:
    loop = asyncio.new_event_loop()
    try:
        rig = ExecutorRig()
        loop.run_until_complete(rig.runtime.start())
        rig.runtime.primary_breaker.force_open()

        async def submit_two() -> list[TaskHandle]:
            handles = [rig.submit(tokens=1), rig.submit(tokens=1)]
            await rig.clock.settle()
            return handles

        _first, second = loop.run_until_complete(submit_two())
        assert second.state is TaskState.QUEUED  # the CPU slot is taken
        rig.runtime.primary_breaker.reset()  # plain code, no loop running
        loop.run_until_complete(rig.clock.settle())
        assert second.state is not TaskState.QUEUED  # dispatched to the GPU meanwhile
        assert second.engine == "gpu"
        loop.run_until_complete(rig.executor.aclose())
    finally:
        loop.close()


def test_priority_parse_is_shared_by_the_header_and_the_cli() -> None:
    assert Priority.parse("critical") is P.CRITICAL
    assert Priority.parse(" High ") is P.HIGH
    with pytest.raises(ValueError) as info:
        Priority.parse("urgent")
    assert str(info.value) == "'urgent' is not one of critical, high, normal, low"


def test_the_executor_uses_its_runtimes_hub() -> None:
    hub = EventHub()
    runtime = RuntimeManager(MockGPUEngine(clock=VirtualClock()), hub=hub)
    assert TaskExecutor(runtime).hub is hub
    assert TaskExecutor(runtime, hub=hub).hub is hub
    # A second hub would hide the runtime's breaker transitions from the executor.
    with pytest.raises(ValueError, match="share its runtime's event hub"):
        TaskExecutor(runtime, hub=EventHub())


async def test_overload_is_published_on_the_hub_and_logged_once_by_it() -> None:
    async with ExecutorRig(max_queue_size=1, rejection_threshold=2, hard_open_duration=5) as rig:
        rig.runtime.primary_breaker.force_open("GPU lost")
        rig.cpu.slow_down(100)
        with capture_logs() as logs:
            rig.submit()
            rig.submit()
            for _ in range(2):
                with pytest.raises(QueueFullError):
                    rig.submit()
            await rig.clock.advance(5)
        published = [e.kind for e in rig.runtime.hub.history if e.kind.startswith("executor.")]
        assert published == ["executor.overloaded", "executor.recovered"]
        lines = [e for e in logs if str(e.get("status", "")).startswith("executor.")]
        assert [(e["service"], e["level"], e["status"]) for e in lines] == [
            ("events", "warning", "executor.overloaded"),
            ("events", "info", "executor.recovered"),
        ]
        assert lines[0]["rejections"] == 2


async def test_a_handle_cancels_through_its_owners_task_control() -> None:
    asked: list[tuple[str, str]] = []

    class Owner:
        def cancel_task(self, handle: TaskHandle, reason: str) -> bool:
            asked.append((handle.id, reason))
            return True

    clock = VirtualClock()
    channel = ChunkChannel(2, clock=clock, consumer_timeout=1.0)
    handle = TaskHandle(
        Owner(),
        "t1",
        GenerationRequest(prompt="p"),
        priority=P.LOW,
        now=0.0,
        order=0,
        channel=channel,
    )
    assert handle.cancel("test") is True
    await handle.aclose()  # never started: nothing to wait for, asks once more
    assert asked == [("t1", "test"), ("t1", "its consumer stopped reading")]


async def test_the_chunk_channel_waits_for_space_then_gives_up_on_a_gone_reader() -> None:
    clock = VirtualClock()
    channel = ChunkChannel(1, clock=clock, consumer_timeout=2.0)
    chunk = GenerationChunk(text="a", index=0, engine="cpu")
    assert channel.send_nowait(chunk)
    assert not channel.send_nowait(chunk)  # full: the fast path never waits
    second = asyncio.create_task(channel.send(chunk))
    await clock.advance(1.0)
    assert not second.done()  # full: waiting for the reader
    assert channel.take() is chunk
    assert await second is True
    third = asyncio.create_task(channel.send(chunk))
    await clock.advance(2.0)
    assert await third is False  # nothing read for consumer_timeout: the reader is gone
    assert len(channel) == 1


async def test_a_reader_that_fell_behind_gets_the_waiting_chunks_as_one() -> None:
    channel = ChunkChannel(8, clock=VirtualClock(), consumer_timeout=None)
    lp = [TokenLogprob(token=t, logprob=-0.5, token_bytes=t.encode()) for t in ("a", "b", "c")]
    for i, text in enumerate("abc"):
        chunk = GenerationChunk(
            text=text, index=i, engine="gpu", prompt_tokens=4 if i == 0 else None, logprobs=(lp[i],)
        )
        assert channel.send_nowait(chunk)
    assert channel.send_nowait(GenerationChunk(text="d", index=3, engine="cpu"))  # a failover
    merged = channel.take()
    assert merged == GenerationChunk(
        text="abc", index=2, engine="gpu", prompt_tokens=4, logprobs=tuple(lp), tokens=3
    )
    assert channel.take() == GenerationChunk(text="d", index=3, engine="cpu")
    assert channel.take() is None
    alone = GenerationChunk(text="e", index=4, engine="cpu", finish_reason="length")
    assert channel.send_nowait(alone)
    assert channel.take() is alone  # a reader that keeps up: one chunk per token


def test_embedding_vectors_are_never_merged() -> None:
    vectors = [
        GenerationChunk(text="", index=i, engine="cpu", embedding=(float(i),)) for i in range(3)
    ]
    assert merge_chunks(vectors) == vectors
