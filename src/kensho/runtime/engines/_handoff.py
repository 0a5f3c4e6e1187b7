"""Items from an engine's worker thread to the event loop, many per loop wake-up.

A worker thread (``TorchEngine``'s decode loop) produces one chunk per token. Handing
each one over with its own ``call_soon_threadsafe`` costs a self-pipe write, a loop
wake-up and a fight for the GIL per token (about 80 µs on the demo model). Here the
worker appends to a deque and schedules a wake-up only when none is pending; the
loop, once woken, takes *every* item that is ready. The consumer still sees one item
per token, and pays one wake-up per batch: when the loop is behind, the tokens that
piled up in the meantime cost nothing more.

The deque is bounded by ``window``: a worker that gets that far ahead of its consumer
waits until the consumer takes the batch (back-pressure reaches the decode loop, so a
reader that stalls does not let the model run on to ``max_tokens``), and
:meth:`cancel` wakes it at once so it can see that it must stop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Generic, TypeVar

__all__ = ["ThreadHandoff"]

T = TypeVar("T")


class ThreadHandoff(Generic[T]):
    """One producer thread, one consumer task on ``loop``.

    ``put`` is called from the worker thread, ``take`` and ``cancel`` from the loop
    (``cancel`` is also safe from any thread: it only sets events).
    """

    __slots__ = (
        "_items",
        "_lock",
        "_loop",
        "_scheduled",
        "_space",
        "_waiter",
        "_window",
        "cancelled",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, window: int = 32) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._loop = loop
        self._window = window
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False  # a wake-up is queued on the loop and has not run yet
        self._waiter: asyncio.Future[None] | None = None
        self._space = threading.Event()
        self._space.set()
        #: Set when the consumer is gone (or the engine closes): the worker stops.
        self.cancelled = threading.Event()

    def put(self, item: T) -> None:
        """Worker side: hand ``item`` over; waits while ``window`` items are untaken."""
        with self._lock:
            self._items.append(item)
            # Never wait once cancelled: cancel() may have set _space before this.
            full = len(self._items) >= self._window and not self.cancelled.is_set()
            if full:
                self._space.clear()
            wake = not self._scheduled
            self._scheduled = True
        if wake:
            self._loop.call_soon_threadsafe(self._wake)
        if full:
            self._space.wait()  # set again by take() or cancel()

    def cancel(self) -> None:
        """The consumer is gone: tell the worker, and release it if it waits for room."""
        self.cancelled.set()
        self._space.set()

    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[T]:
        """Loop side: every item ready now, in order (waits until there is at least one)."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    if not self._space.is_set():  # Event.set() takes a lock: only if needed
                        self._space.set()
                    return items
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
