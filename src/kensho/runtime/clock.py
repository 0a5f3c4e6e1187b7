"""Injectable time: a :class:`Clock` protocol, the real one, and a virtual one for tests.

Why inject time at all: the breaker waits 60 s before probing the GPU again, the
executor expires tasks after 30 s in the queue. Tests that really waited would take
minutes and still be flaky; tests on a :class:`VirtualClock` jump over those waits in
microseconds and are exactly reproducible. Every time-dependent component of the
runtime takes a ``clock`` and never calls ``time`` or ``asyncio.sleep`` itself.

A clock offers three things: ``monotonic()`` (seconds, only differences matter),
``await sleep(seconds)`` and ``call_later(delay, callback)`` (a cancellable timer, so
that e.g. the breaker's OPEN → HALF_OPEN change happens, and is announced, even when
no request arrives). :func:`timeout` builds a cancel scope on any clock.

:class:`VirtualClock` is in the spirit of trio's ``MockClock``: time stands still until
``await clock.advance(seconds)``, which fires the timers that fall due, in order, and
lets the woken tasks run before moving on. It ships in the package so that users can
test their own code built on Kensho the same way.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, runtime_checkable

__all__ = [
    "AsyncioClock",
    "Clock",
    "MockClock",
    "TimerHandle",
    "VirtualClock",
    "timeout",
]


@runtime_checkable
class TimerHandle(Protocol):
    """A scheduled callback that can still be cancelled (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None:
        """Prevent the callback from running; harmless if it already ran."""


@runtime_checkable
class Clock(Protocol):
    """The source of time for the runtime: monotonic seconds, sleeping and timers."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale; only differences are meaningful."""

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds`` of this clock's time."""

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Run ``callback()`` once ``delay`` seconds of this clock's time have passed."""


class _InertTimer:
    __slots__ = ()

    def cancel(self) -> None:
        """Nothing was scheduled."""


class AsyncioClock:
    """The real clock: monotonic time, and the running event loop's sleeps and timers.

    It finds the loop lazily, so one instance can be created at import time and used
    from whichever loop is running when it is called. Only differences of
    ``monotonic()`` are used, so it needs no lookup of the loop's own clock.
    """

    __slots__ = ()

    def monotonic(self) -> float:
        """``time.monotonic()``: what asyncio's loops use, without looking the loop up."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """``loop.call_later`` on the running loop.

        Outside a running loop (a breaker used from plain synchronous code) nothing
        could run the callback: the returned handle is inert, and callers must not
        depend on it (the breaker then catches up on its next call).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _InertTimer()
        return loop.call_later(max(0.0, delay), callback)

    def __repr__(self) -> str:
        return "AsyncioClock()"


class _VirtualTimer:
    """One entry of the virtual clock's timer heap."""

    __slots__ = ("callback", "cancelled", "deadline", "seq")

    def __init__(self, deadline: float, seq: int, callback: Callable[[], object]) -> None:
        self.deadline = deadline
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def __lt__(self, other: _VirtualTimer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """A clock whose time moves only when a test says so; nothing really sleeps.

    ::

        clock = VirtualClock()
        task = asyncio.create_task(component_that_waits(clock))
        await clock.advance(60)      # fires every timer due within those 60 s, in order

    Between timers, ``advance`` lets the event loop run until no task is ready any
    more, so a task woken at t=10 that sleeps again for 5 s is woken again at t=15
    within the same ``advance(60)``.
    """

    __slots__ = ("_max_settle", "_now", "_seq", "_timers")

    def __init__(self, start: float = 0.0, *, max_settle_steps: int = 10_000) -> None:
        self._now = float(start)
        self._timers: list[_VirtualTimer] = []
        self._seq = itertools.count()
        self._max_settle = max_settle_steps

    def monotonic(self) -> float:
        """The current virtual time."""
        return self._now

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Schedule ``callback`` at ``now + delay`` virtual seconds."""
        timer = _VirtualTimer(self._now + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    async def sleep(self, seconds: float) -> None:
        """Wait until ``advance`` moves time past ``now + seconds`` (cancellable)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    def next_deadline(self) -> float | None:
        """When the next pending timer falls due, or ``None`` when none is pending."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0].deadline if self._timers else None

    @property
    def pending_timers(self) -> int:
        """How many timers are scheduled and not cancelled."""
        return sum(1 for t in self._timers if not t.cancelled)

    async def settle(self) -> None:
        """Let the event loop run until no task is ready (time does not move).

        Relies on the loop's ready queue when it can see it (CPython's event loops);
        otherwise yields a fixed number of times.
        """
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        for step in range(self._max_settle):
            await asyncio.sleep(0)
            if ready is None:
                if step >= 100:
                    return
            elif not ready:
                return

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing due timers in deadline order."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards ({seconds} s)")
        target = self._now + seconds
        await self.settle()
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            timer = heapq.heappop(self._timers)
            self._now = max(self._now, timer.deadline)
            timer.callback()
            await self.settle()
        self._now = target
        await self.settle()

    async def advance_to_next(self) -> float | None:
        """Jump to the next timer's deadline and fire it; returns the new time or ``None``."""
        deadline = self.next_deadline()
        if deadline is None:
            return None
        await self.advance(max(0.0, deadline - self._now))
        return self._now

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now:g}, timers={self.pending_timers})"


#: trio's name for the same idea, for readers who know it.
MockClock = VirtualClock


class timeout:
    """``async with timeout(clock, 5):`` — cancel the block after 5 s of ``clock`` time.

    Like ``asyncio.timeout`` but on an injectable clock, so deadlines in the runtime can
    be tested on virtual time. Raises ``TimeoutError`` when the time runs out; a
    cancellation from elsewhere passes through untouched. ``seconds=None`` disables it.
    """

    __slots__ = ("_clock", "_expired", "_handle", "_seconds", "_task")

    def __init__(self, clock: Clock, seconds: float | None) -> None:
        self._clock = clock
        self._seconds = seconds
        self._handle: TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._expired = False

    @property
    def expired(self) -> bool:
        """Whether the block was cancelled because its time ran out."""
        return self._expired

    def _on_timeout(self) -> None:
        if self._task is not None and not self._task.done():
            self._expired = True
            self._task.cancel()

    async def __aenter__(self) -> timeout:
        if self._seconds is not None:
            self._task = asyncio.current_task()
            if self._task is None:  # pragma: no cover - only outside a task
                raise RuntimeError("timeout() must be used inside an asyncio task")
            self._handle = self._clock.call_later(self._seconds, self._on_timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired and self._task is not None:
            remaining = self._task.uncancel()
            if remaining == 0 and exc_type is asyncio.CancelledError:
                raise TimeoutError(f"timed out after {self._seconds:g} s") from exc
        return False
