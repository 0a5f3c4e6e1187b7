"""EventHub: fan status events out to callbacks and to async-iterator subscribers.

The runtime manager and the executor both publish status events (fallback activated,
GPU restored, overloaded ...). Renderers consume them differently — the CLI draws
them, the server streams them as SSE, tests assert on them — so the hub offers both
synchronous listeners and ``async for event in hub.stream()``.

A subscriber that does not keep up must not slow the runtime down nor grow memory
without bound: each stream has a bounded buffer and drops its *oldest* events when
full (the newest state is what a user needs), counting what it dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from kensho.events import Event
from kensho.telemetry import get_logger

__all__ = ["EventHub", "Listener"]

Listener = Callable[[Event], object]

log = get_logger("runtime.events")


class _Subscriber:
    __slots__ = ("buffer", "dropped", "maxlen", "waiter")

    def __init__(self, maxlen: int) -> None:
        self.buffer: deque[Event] = deque()
        self.maxlen = maxlen
        self.dropped = 0
        self.waiter: asyncio.Future[None] | None = None

    def push(self, event: Event) -> None:
        if len(self.buffer) >= self.maxlen:
            self.buffer.popleft()
            self.dropped += 1
        self.buffer.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class EventHub:
    """Publish events to listeners and streams; never raises into the publisher."""

    __slots__ = ("_listeners", "_subscribers", "history")

    def __init__(self, *, history: int = 64) -> None:
        self._listeners: list[Listener] = []
        self._subscribers: list[_Subscriber] = []
        self.history: deque[Event] = deque(maxlen=history)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event, synchronously."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every listener and subscriber, and keep it in history."""
        self.history.append(event)
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:  # a renderer bug must not break the runtime
                log.exception("event listener failed", kind=event.kind)
        for subscriber in self._subscribers:
            subscriber.push(event)

    @property
    def subscribers(self) -> int:
        """How many streams are currently open."""
        return len(self._subscribers)

    async def stream(self, *, buffer: int = 256, replay: bool = False) -> AsyncIterator[Event]:
        """Yield events as they are emitted (``replay`` first yields the history).

        The subscription starts when iteration starts and ends when the consumer stops
        (``break``, ``aclose()`` or cancellation).
        """
        subscriber = _Subscriber(max(1, buffer))
        if replay:
            for event in self.history:
                subscriber.push(event)
        self._subscribers.append(subscriber)
        try:
            while True:
                while subscriber.buffer:
                    yield subscriber.buffer.popleft()
                subscriber.waiter = asyncio.get_running_loop().create_future()
                try:
                    await subscriber.waiter
                finally:
                    subscriber.waiter = None
        finally:
            self._subscribers.remove(subscriber)
            if subscriber.dropped:
                log.warning("slow event subscriber dropped events", dropped=subscriber.dropped)
