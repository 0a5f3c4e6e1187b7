"""The injectable clocks: virtual time moves only on ``advance``, timers fire in order."""

from __future__ import annotations

import asyncio

import pytest

from kensho.runtime.clock import AsyncioClock, Clock, VirtualClock, timeout


async def test_virtual_time_stands_still_until_advanced() -> None:
    clock = VirtualClock(start=100.0)
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(5)
        woke.append(clock.monotonic())

    task = asyncio.create_task(sleeper())
    await clock.advance(4.999)
    assert woke == []
    assert clock.monotonic() == pytest.approx(104.999)
    await clock.advance(0.001)
    assert woke == [105.0]
    await task


async def test_advance_fires_timers_in_deadline_order_and_runs_woken_tasks() -> None:
    clock = VirtualClock()
    order: list[tuple[str, float]] = []

    async def ticker(name: str, period: float, times: int) -> None:
        for _ in range(times):
            await clock.sleep(period)
            order.append((name, clock.monotonic()))

    tasks = [
        asyncio.create_task(ticker("a", 3, 3)),
        asyncio.create_task(ticker("b", 4, 2)),
    ]
    # One advance covers several re-sleeps: a woken task that sleeps again is woken again.
    await clock.advance(10)
    assert order == [("a", 3), ("b", 4), ("a", 6), ("b", 8), ("a", 9)]
    await asyncio.gather(*tasks)


async def test_call_later_can_be_cancelled_and_next_deadline_skips_it() -> None:
    clock = VirtualClock()
    fired: list[str] = []
    first = clock.call_later(1, lambda: fired.append("first"))
    clock.call_later(2, lambda: fired.append("second"))
    first.cancel()
    assert clock.next_deadline() == 2
    assert clock.pending_timers == 1
    assert await clock.advance_to_next() == 2
    assert fired == ["second"]
    assert await clock.advance_to_next() is None


async def test_sleep_is_cancellable_and_leaves_no_timer() -> None:
    clock = VirtualClock()
    task = asyncio.create_task(clock.sleep(60))
    await clock.settle()
    assert clock.pending_timers == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.pending_timers == 0


async def test_advance_rejects_negative_time() -> None:
    with pytest.raises(ValueError, match="backwards"):
        await VirtualClock().advance(-1)


async def test_timeout_raises_timeout_error_on_virtual_time() -> None:
    clock = VirtualClock()

    async def slow() -> None:
        async with timeout(clock, 5):
            await clock.sleep(10)

    task = asyncio.create_task(slow())
    await clock.advance(5)
    with pytest.raises(TimeoutError, match="5 s"):
        await task
    assert clock.monotonic() == 5


async def test_timeout_does_not_fire_when_block_finishes_in_time() -> None:
    clock = VirtualClock()
    async with timeout(clock, 5) as scope:
        await clock.sleep(0)
    assert not scope.expired
    assert clock.pending_timers == 0


async def test_timeout_lets_outside_cancellation_through() -> None:
    clock = VirtualClock()

    async def guarded() -> None:
        async with timeout(clock, 50):
            await clock.sleep(100)

    task = asyncio.create_task(guarded())
    await clock.settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_timeout_none_disables_the_deadline() -> None:
    clock = VirtualClock()
    async with timeout(clock, None) as scope:
        await clock.sleep(0)
    assert not scope.expired
    assert clock.pending_timers == 0


async def test_asyncio_clock_follows_the_running_loop() -> None:
    clock = AsyncioClock()
    assert isinstance(clock, Clock)
    assert isinstance(VirtualClock(), Clock)
    loop = asyncio.get_running_loop()
    assert abs(clock.monotonic() - loop.time()) < 1.0
    fired = asyncio.Event()
    clock.call_later(0, fired.set)
    await asyncio.wait_for(fired.wait(), 5)
    await clock.sleep(0)


def test_asyncio_clock_works_without_a_loop() -> None:
    assert AsyncioClock().monotonic() > 0


def test_asyncio_clock_timer_outside_a_loop_is_inert() -> None:
    fired: list[int] = []
    handle = AsyncioClock().call_later(0, lambda: fired.append(1))
    handle.cancel()
    assert fired == []
