"""EventHub: fan status events out to callbacks and to async-iterator subscribers.

The kernel creates one hub and hands it to the storage manager, the runtime manager
and the executor: every status event of the service (integrity progress, breaker
transitions, fallback activated, GPU restored, overloaded ...) goes through it, in
the order it happened. Renderers consume them differently — the CLI draws them, the
server streams them as SSE, tests assert on them — so the hub offers both
synchronous listeners and ``async for event in hub.stream()``.

Logging is one more listener (:func:`log_event`, installed by default): an event
whose class declares a ``log_level`` is written to the log of its ``log_service``
with its message (or fixed ``log_name``) and fields, so a component announces a
fact once, by emitting it, instead of logging it and emitting it by hand.

A subscriber that does not keep up must not slow the runtime down nor grow memory
without bound: each stream has a bounded buffer and drops its *oldest* events when
full (the newest state is what a user needs), counting what it dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

from kensho.events import Event
from kensho.telemetry import get_logger

__all__ = ["EventHub", "Listener", "log_event"]

Listener = Callable[[Event], object]

log = get_logger("events")

_LEVELS = logging.getLevelNamesMapping()


def log_event(event: Event) -> None:
    """Write ``event`` to the log at its class's ``log_level`` (none: not logged).

    The line is the event's ``log_name`` (else its message), under its class's
    ``log_service``, with ``status`` (its kind) and its fields, so a log reader sees
    exactly what the status stream shows.
    """
    level = event.log_level
    if level is None:
        return
    fields = event.to_dict()
    for key in ("kind", "message", "ts"):
        fields.pop(key, None)
    name = event.log_name or event.message
    get_logger(event.log_service).log(_LEVELS[level.upper()], name, status=event.kind, **fields)


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
    """Publish events to listeners and streams; never raises into the publisher.

    ``history`` events are kept for late subscribers (``stream(replay=True)``);
    ``log_events=False`` leaves out the :func:`log_event` listener.
    """

    __slots__ = ("_listeners", "_subscribers", "history")

    def __init__(self, *, history: int = 64, log_events: bool = True) -> None:
        self._listeners: list[Listener] = [log_event] if log_events else []
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
