"""ThreadHandoff: a real worker thread handing items to a real event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from kensho.runtime.engines._handoff import ThreadHandoff


class CountingLoop(asyncio.SelectorEventLoop):
    """A real selector loop that counts the wake-ups other threads schedule on it."""

    threadsafe_calls = 0

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.threadsafe_calls += 1
        return super().call_soon_threadsafe(callback, *args, **kwargs)


def run_on_counting_loop(main: Callable[[CountingLoop], Any]) -> Any:
    loop = CountingLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()


def test_items_ready_together_are_taken_in_one_wake_up() -> None:
    async def main(loop: CountingLoop) -> tuple[list[int], int]:
        handoff: ThreadHandoff[int] = ThreadHandoff(loop, window=32)
        worker = threading.Thread(target=lambda: [handoff.put(i) for i in range(5)])
        worker.start()
        worker.join()  # all five are in before the loop runs again
        return await handoff.take(), loop.threadsafe_calls

    items, wake_ups = run_on_counting_loop(main)
    assert items == [0, 1, 2, 3, 4]
    assert wake_ups == 1


def test_every_item_arrives_once_and_in_order_across_batches() -> None:
    async def main(loop: CountingLoop) -> list[int]:
        handoff: ThreadHandoff[int | None] = ThreadHandoff(loop, window=8)

        def work() -> None:
            for i in range(500):
                handoff.put(i)
            handoff.put(None)

        worker = threading.Thread(target=work)
        worker.start()
        received: list[int] = []
        while True:
            batch = await handoff.take()
            received.extend(i for i in batch if i is not None)
            if batch[-1] is None:
                break
        worker.join()
        return received

    assert run_on_counting_loop(main) == list(range(500))


async def test_a_worker_window_items_ahead_waits_for_the_consumer() -> None:
    handoff: ThreadHandoff[int] = ThreadHandoff(asyncio.get_running_loop(), window=4)
    worker = threading.Thread(target=lambda: [handoff.put(i) for i in range(10)])
    worker.start()
    # Unbounded, ten puts take microseconds; bounded, the worker is still waiting.
    await asyncio.to_thread(worker.join, 0.5)
    assert worker.is_alive()
    assert await handoff.take() == [0, 1, 2, 3]
    received = [0, 1, 2, 3]
    while len(received) < 10:
        received.extend(await handoff.take())
    await asyncio.to_thread(worker.join, 5)
    assert not worker.is_alive()
    assert received == list(range(10))


async def test_cancel_releases_a_worker_waiting_for_room() -> None:
    handoff: ThreadHandoff[int] = ThreadHandoff(asyncio.get_running_loop(), window=1)
    returned = threading.Event()

    def work() -> None:
        handoff.put(0)  # the window is full at once: waits for take() or cancel()
        returned.set()

    worker = threading.Thread(target=work)
    worker.start()
    handoff.cancel()
    await asyncio.to_thread(worker.join, 5)
    assert returned.is_set()
    assert handoff.cancelled.is_set()


def test_put_after_cancel_never_waits() -> None:
    async def main(loop: CountingLoop) -> list[int]:
        handoff: ThreadHandoff[int] = ThreadHandoff(loop, window=1)
        handoff.cancel()
        worker = threading.Thread(target=lambda: [handoff.put(i) for i in range(3)])
        worker.start()
        await asyncio.to_thread(worker.join, 5)
        assert not worker.is_alive()
        return await handoff.take()

    assert run_on_counting_loop(main) == [0, 1, 2]


def test_a_window_below_one_is_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="window must be >= 1"):
            ThreadHandoff(loop, window=0)
    finally:
        loop.close()
