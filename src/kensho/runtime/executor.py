"""TaskExecutor: a bounded priority queue in front of the runtime, with controlled rejection.

Why: the fallback CPU engine is several times slower than the GPU. Without a bound,
a burst that the GPU would absorb piles up behind the CPU, every request waits minutes
and then times out anyway. The executor keeps the system responsive by refusing work
*early and explicitly* instead:

- priorities CRITICAL > HIGH > NORMAL > LOW, FIFO within a level (Triton's model);
- a bounded queue (``max_queue_size``) and a concurrency limit per engine;
- when full, an incoming task that outranks the lowest queued task sheds it (that
  task's submitter gets :class:`QueueFullError` with ``reason="shed"``); otherwise the
  newcomer is rejected at once with a retry-after estimate;
- while the runtime runs on the slower engine, the effective capacity shrinks to what
  that engine can drain within ``max_queue_wait`` (measured throughput), and grows back
  after recovery — the roadmap's "dynamic MAX_QUEUE_SIZE";
- sustained rejection (``rejection_threshold`` within ``rejection_window``) is a *hard
  open*: only CRITICAL tasks are admitted until the pressure ends, announced as
  ``overloaded`` then ``recovered`` events. Like Envoy's overload manager it is a
  state of the load, not a cool-down: it ends as soon as a task finishes with the
  queue below its low-water mark (``hard_open_low_water`` of the capacity: the
  queue drained and the engine keeps up); ``hard_open_duration`` is only the upper
  bound. Work is never re-routed to the saturated engine (the original's bug);
- every refusal carries an honest ``retry_after``: when that request would be
  admitted, from the queue ahead of it and the measured service time (a prior of
  1 s per task until a task has completed on that engine), never a fixed cool-down;
- every accepted task ends exactly once — completed, failed, cancelled, timed out
  (queue wait or total deadline) or shed — and its submitter is told which.

Submitting is synchronous and dispatching happens inline (no dispatcher task to wake),
which keeps the cost per task to a few microseconds.

::

    async with TaskExecutor(runtime) as executor:
        handle = executor.submit(request, priority=Priority.HIGH)
        async with handle:                 # leaving early cancels the task
            async for chunk in handle:
                ...
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn, Protocol

from kensho.config import RuntimeSettings
from kensho.errors import QueueFullError, TaskTimeoutError
from kensho.events import (
    BreakerStateChanged,
    Event,
    QueueCapacityChanged,
    RuntimeOverloaded,
    RuntimeRecovered,
)
from kensho.runtime.clock import AsyncioClock, Clock, TimerHandle, timeout
from kensho.runtime.engines.base import Engine, GenerationChunk, GenerationRequest
from kensho.runtime.hub import EventHub
from kensho.telemetry import get_logger

__all__ = [
    "Backend",
    "ExecutorStatistics",
    "Priority",
    "TaskExecutor",
    "TaskHandle",
    "TaskOutcome",
    "TaskState",
]

log = get_logger("runtime.executor")

# The service time assumed for an engine on which no task has completed yet.
_UNMEASURED_SERVICE = 1.0
# The shortest retry-after ever suggested: retrying sooner would only be refused again.
_MIN_RETRY = 0.1


class Priority(enum.IntEnum):
    """Task priority; higher values are served first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3


class TaskState(enum.StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class TaskOutcome(enum.StrEnum):
    """How a task ended (exactly one per accepted task)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    SHED = "shed"


class Backend(Protocol):
    """What the executor runs tasks on: a :class:`~kensho.runtime.manager.RuntimeManager`."""

    @property
    def active_engine(self) -> Engine:
        """The engine new requests go to now (its concurrency limit applies)."""

    @property
    def degraded(self) -> bool:
        """True while running on the fallback engine."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's chunks."""


@dataclass(frozen=True, slots=True)
class ExecutorStatistics:
    """A snapshot of the executor (anyio-style ``statistics()``).

    ``queued`` maps priority names to queue depth, ``in_flight`` engine names to
    running tasks. Wait times (queue entry to start, seconds) are over the last
    2048 started tasks; ``None`` before the first.
    """

    capacity: int
    max_queue_size: int
    queued: dict[str, int]
    queued_total: int
    in_flight: dict[str, int]
    in_flight_total: int
    accepted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    shed: int
    rejected: int
    overloaded: bool
    wait_p50: float | None
    wait_p90: float | None
    wait_p99: float | None


class _ConsumerGoneError(Exception):
    """Internal: the consumer stopped reading; the task is cancelled."""


class TaskHandle:
    """The submitter's side of a task: an async iterator of chunks, and its fate.

    Iterating yields the chunks; when the task did not complete, iteration ends by
    raising why: :class:`QueueFullError` (shed), :class:`TaskTimeoutError`, the engine
    error, or ``asyncio.CancelledError`` (cancelled, like awaiting a cancelled future).
    Leaving ``async with handle`` early, or :meth:`aclose`, cancels the task.

    ``submit_order``, ``start_order`` and ``end_order`` stamp the task's submission,
    start and end on one executor-wide counter, so traces and tests can tell exactly
    what was waiting when a task started.
    """

    __slots__ = (
        "_buffer",
        "_cancel_reason",
        "_deadline_timer",
        "_done",
        "_executor",
        "_queue_timer",
        "_runner",
        "_space",
        "_waiter",
        "end_order",
        "engine",
        "error",
        "finished_at",
        "id",
        "outcome",
        "priority",
        "request",
        "start_order",
        "started_at",
        "state",
        "submit_order",
        "submitted_at",
    )

    def __init__(
        self,
        executor: TaskExecutor,
        task_id: str,
        request: GenerationRequest,
        *,
        priority: Priority,
        now: float,
        order: int,
    ) -> None:
        self._executor = executor
        self.id = task_id
        self.request = request
        self.priority = priority
        self.state = TaskState.QUEUED
        self.outcome: TaskOutcome | None = None
        self.error: BaseException | None = None
        self.engine: str | None = None
        self.submitted_at = now
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.submit_order = order
        self.start_order: int | None = None
        self.end_order: int | None = None
        self._buffer: deque[GenerationChunk] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._done: asyncio.Future[TaskOutcome] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._queue_timer: TimerHandle | None = None
        self._deadline_timer: TimerHandle | None = None
        self._cancel_reason: tuple[TaskOutcome, BaseException] | None = None

    @property
    def done(self) -> bool:
        """Whether the task has ended (see :attr:`outcome`)."""
        return self.outcome is not None

    def cancel(self, reason: str = "cancelled by its submitter") -> bool:
        """Cancel the task (queued or running); False if it had already ended."""
        return self._executor._cancel(self, TaskOutcome.CANCELLED, _cancelled(self, reason))

    async def aclose(self) -> None:
        """Stop reading: cancel the task if it is still going, and wait for it to end."""
        if not self.done:
            self.cancel("its consumer stopped reading")
        runner = self._runner
        if runner is not None and not runner.done():
            await asyncio.wait([runner])

    async def __aenter__(self) -> TaskHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> TaskHandle:
        return self

    async def __anext__(self) -> GenerationChunk:
        while True:
            if self._buffer:
                chunk = self._buffer.popleft()
                space = self._space
                if space is not None and not space.done():
                    space.set_result(None)
                return chunk
            if self.outcome is not None:
                if self.outcome is TaskOutcome.COMPLETED or self.error is None:
                    raise StopAsyncIteration
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def wait(self) -> TaskOutcome:
        """Wait until the task ends and return how (never raises the task's error)."""
        if self.outcome is not None:
            return self.outcome
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._done)

    async def result(self) -> str:
        """Read the whole stream and return its text (raises like iteration does)."""
        return "".join([chunk.text async for chunk in self])

    # -- producer side (executor) ---------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r}, {self.priority.name}, {self.state.value})"


def _cancelled(handle: TaskHandle, reason: str) -> asyncio.CancelledError:
    return asyncio.CancelledError(f"task {handle.id} was cancelled: {reason}")


class TaskExecutor:
    """Bounded priority executor with shedding, deadlines and hard-open protection.

    ``concurrency`` maps engine names or kinds (``{"gpu": 4, "cpu": 1}``) to how many
    tasks may run on that engine at once (``default_concurrency`` for others).
    ``max_queue_wait`` is the default queue-wait deadline *and* the horizon for the
    dynamic capacity. ``stream_buffer`` chunks may wait for a consumer; a consumer
    that leaves them unread for ``consumer_timeout`` seconds is considered gone.

    ``rejection_threshold`` rejections within ``rejection_window`` seconds start a
    hard open; it ends when a task finishes with fewer than ``hard_open_low_water``
    x capacity tasks queued (at least: an empty queue), or after
    ``hard_open_duration`` seconds at most.
    """

    def __init__(
        self,
        runtime: Backend,
        *,
        clock: Clock | None = None,
        max_queue_size: int = 100,
        concurrency: Mapping[str, int] | None = None,
        default_concurrency: int = 1,
        max_queue_wait: float | None = 30.0,
        dynamic_capacity: bool = True,
        min_queue_size: int = 1,
        rejection_threshold: int = 5,
        rejection_window: float = 10.0,
        hard_open_duration: float = 30.0,
        hard_open_low_water: float = 0.5,
        stream_buffer: int = 64,
        consumer_timeout: float | None = 30.0,
        hub: EventHub | None = None,
    ) -> None:
        if max_queue_size < 1 or min_queue_size < 1 or min_queue_size > max_queue_size:
            raise ValueError("need 1 <= min_queue_size <= max_queue_size")
        if default_concurrency < 1 or any(v < 1 for v in (concurrency or {}).values()):
            raise ValueError("concurrency limits must be >= 1")
        if rejection_threshold < 1 or rejection_window <= 0 or hard_open_duration <= 0:
            raise ValueError("rejection_threshold >= 1, window and duration > 0 required")
        if not 0 < hard_open_low_water <= 1:
            raise ValueError(
                f"hard_open_low_water is a fraction of the queue capacity in (0, 1], "
                f"got {hard_open_low_water}"
            )
        if stream_buffer < 1:
            raise ValueError(f"stream_buffer must be >= 1, got {stream_buffer}")
        self.runtime = runtime
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self.max_queue_size = max_queue_size
        self.concurrency = dict(concurrency or {})
        self.default_concurrency = default_concurrency
        self.max_queue_wait = max_queue_wait
        self.dynamic_capacity = dynamic_capacity
        self.min_queue_size = min_queue_size
        self.rejection_threshold = rejection_threshold
        self.rejection_window = rejection_window
        self.hard_open_duration = hard_open_duration
        self.hard_open_low_water = hard_open_low_water
        self.stream_buffer = stream_buffer
        self.consumer_timeout = consumer_timeout
        runtime_hub = getattr(runtime, "hub", None)
        self.hub: EventHub = (
            hub
            if hub is not None
            else runtime_hub
            if isinstance(runtime_hub, EventHub)
            else EventHub()
        )
        self.hub.add_listener(self._on_event)
        self._queues: tuple[deque[TaskHandle], ...] = tuple(deque() for _ in Priority)
        self._queued = 0
        self._in_flight: dict[str, int] = {}
        self._running = 0
        self._active: set[TaskHandle] = set()
        self._ids = itertools.count(1)
        self._order = itertools.count()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: dict[str, float] = {}  # EWMA of seconds per task, by engine
        self._waits: deque[float] = deque(maxlen=2048)
        self._rejection_times: deque[float] = deque()
        self._hard_open_until: float | None = None
        self._hard_open_since = 0.0
        self._hard_open_timer: TimerHandle | None = None
        self._capacity_reported = max_queue_size
        self._accepted = self._completed = self._failed = self._cancelled = 0
        self._timed_out = self._shed = self._rejected = 0

    @classmethod
    def from_settings(
        cls, runtime: Backend, settings: RuntimeSettings, *, clock: Clock | None = None
    ) -> TaskExecutor:
        """Build an executor from the ``[runtime]`` settings."""
        return cls(
            runtime,
            clock=clock,
            max_queue_size=settings.max_queue_size,
            concurrency=settings.concurrency,
            max_queue_wait=settings.max_queue_wait,
            rejection_threshold=settings.rejection_threshold,
            rejection_window=settings.rejection_window,
            hard_open_duration=settings.hard_open_duration,
            hard_open_low_water=settings.hard_open_low_water,
        )

    # -- public API ---------------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        *,
        priority: Priority = Priority.NORMAL,
        queue_timeout: float | None = None,
        deadline: float | None = None,
        task_id: str | None = None,
    ) -> TaskHandle:
        """Accept ``request`` or raise :class:`QueueFullError` at once.

        ``queue_timeout`` bounds the wait before start (it may only lower
        ``max_queue_wait``, which the dynamic capacity relies on), ``deadline`` the
        whole task from now; both end it with
        :class:`TaskTimeoutError`. Must be called with an event loop running.
        """
        if self._closed:
            raise RuntimeError("this TaskExecutor is closed; create a new one")
        priority = Priority(priority)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        now = self.clock.monotonic()
        if self._hard_open_until is not None and priority < Priority.CRITICAL:
            self._rejected += 1
            retry = self._overload_estimate(self._hard_open_until - now)
            log.debug("task rejected", reason="overloaded", priority=priority.name)
            raise QueueFullError(
                f"overloaded: only CRITICAL tasks are accepted until the queue drains "
                f"({self._queued} tasks waiting) after sustained rejections; retry "
                f"{priority.name} work in {retry:.1f} s",
                reason="overloaded",
                retry_after=retry,
            )
        capacity = self.capacity()
        tid = task_id or f"task-{next(self._ids)}"
        if self._queued >= capacity:
            victim = self._lowest_queued()
            if victim is None or victim.priority >= priority:
                self._reject(priority, capacity, now)
            assert victim is not None
            self._shed_task(victim, priority)
        handle = TaskHandle(self, tid, request, priority=priority, now=now, order=next(self._order))
        self._accepted += 1
        self._queues[priority].append(handle)
        self._queued += 1
        wait = self.max_queue_wait
        if queue_timeout is not None:  # may only lower the executor's bound (as Triton)
            wait = queue_timeout if wait is None else min(wait, queue_timeout)
        if wait is not None:
            handle._queue_timer = self.clock.call_later(
                wait, lambda: self._expire(handle, "queue", wait)
            )
        if deadline is not None:
            handle._deadline_timer = self.clock.call_later(
                deadline, lambda: self._expire(handle, "total", deadline)
            )
        self._pump()
        return handle

    def capacity(self) -> int:
        """The effective queue capacity now (smaller while on a slower engine)."""
        capacity = self.max_queue_size
        if self.dynamic_capacity and self.max_queue_wait is not None and self.runtime.degraded:
            engine = self.runtime.active_engine
            service = self._service.get(engine.name)
            if service is not None and service > 0:
                drainable = self._limit(engine) * self.max_queue_wait / service
                capacity = max(self.min_queue_size, min(capacity, math.floor(drainable)))
        reported = self._capacity_reported
        # Throughput is an average that moves with every task: announce real changes
        # (10 % or a return to full capacity), not every wobble.
        if capacity != reported and (
            capacity == self.max_queue_size or abs(capacity - reported) >= max(1, reported // 10)
        ):
            self._report_capacity(capacity)
        return capacity

    def statistics(self) -> ExecutorStatistics:
        """A snapshot: depth per priority, in flight, counters, wait-time percentiles."""
        waits = sorted(self._waits)

        def pct(q: float) -> float | None:
            if not waits:
                return None
            return waits[min(len(waits) - 1, math.ceil(q * len(waits)) - 1)]

        return ExecutorStatistics(
            capacity=self.capacity(),
            max_queue_size=self.max_queue_size,
            queued={p.name: len(self._queues[p]) for p in Priority},
            queued_total=self._queued,
            in_flight={k: v for k, v in self._in_flight.items() if v},
            in_flight_total=self._running,
            accepted=self._accepted,
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
            timed_out=self._timed_out,
            shed=self._shed,
            rejected=self._rejected,
            overloaded=self._hard_open_until is not None,
            wait_p50=pct(0.5),
            wait_p90=pct(0.9),
            wait_p99=pct(0.99),
        )

    @property
    def overloaded(self) -> bool:
        """True during a hard open (only CRITICAL tasks admitted)."""
        return self._hard_open_until is not None

    async def join(self) -> None:
        """Wait until no task is queued or running."""
        while self._queued or self._running:
            handle = next(iter(self._active), None)
            if handle is None:
                handle = next(h for q in reversed(self._queues) for h in q)
            await handle.wait()
            await asyncio.sleep(0)  # let the runner's clean-up callback run

    async def aclose(self) -> None:
        """Refuse new tasks, cancel queued and running ones, wait for them to end."""
        self._closed = True
        for queue in self._queues:
            for handle in list(queue):
                self._cancel(
                    handle, TaskOutcome.CANCELLED, _cancelled(handle, "executor shut down")
                )
        for handle in self._running_handles():
            self._cancel(handle, TaskOutcome.CANCELLED, _cancelled(handle, "executor shut down"))
        runners = self._runners()
        if runners:
            await asyncio.wait(runners)
        if self._hard_open_timer is not None:
            self._hard_open_timer.cancel()
        self.hub.remove_listener(self._on_event)

    async def __aenter__(self) -> TaskExecutor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- admission --------------------------------------------------------------------------

    def _limit(self, engine: Engine) -> int:
        limits = self.concurrency
        return limits.get(engine.name) or limits.get(engine.kind) or self.default_concurrency

    def _lowest_queued(self) -> TaskHandle | None:
        for queue in self._queues:  # LOW first
            if queue:
                # The newest of the lowest level: it has waited least, so loses least.
                return queue[-1]
        return None

    def _seconds_per_start(self) -> float:
        """How often a queued task starts on the active engine: service time / slots."""
        engine = self.runtime.active_engine
        service = self._service.get(engine.name)
        if service is None or service <= 0:
            service = _UNMEASURED_SERVICE
        return service / self._limit(engine)

    def _retry_estimate(self) -> float:
        """When a refused task would get in: once the queue ahead of it has started."""
        return max(_MIN_RETRY, (self._queued + 1) * self._seconds_per_start())

    def _low_water(self) -> int:
        """The queue depth the hard open waits for: below it, the pressure has ended."""
        return max(1, math.ceil(self.capacity() * self.hard_open_low_water))

    def _overload_estimate(self, remaining: float) -> float:
        """When the hard open should end: the queue drained below the low-water mark
        (one finished task at least), or ``remaining`` s at most."""
        starts = max(1, self._queued - self._low_water() + 1)
        return max(0.0, min(remaining, max(_MIN_RETRY, starts * self._seconds_per_start())))

    def _reject(self, priority: Priority, capacity: int, now: float) -> NoReturn:
        self._rejected += 1
        retry = self._retry_estimate()
        reduced = (
            f", reduced from {self.max_queue_size} while on {self.runtime.active_engine.name}"
            if capacity < self.max_queue_size
            else ""
        )
        log.debug("task rejected", reason="queue full", priority=priority.name, capacity=capacity)
        self._count_rejection(now)
        raise QueueFullError(
            f"too many requests: the queue is full ({self._queued} tasks waiting, capacity "
            f"{capacity}{reduced}) and holds nothing of lower priority than "
            f"{priority.name}; retry in {retry:.1f} s",
            reason="rejected",
            retry_after=retry,
        )

    def _count_rejection(self, now: float) -> None:
        times = self._rejection_times
        times.append(now)
        while times and times[0] <= now - self.rejection_window:
            times.popleft()
        if len(times) >= self.rejection_threshold and self._hard_open_until is None:
            limit = self.hard_open_duration
            self._hard_open_since = now
            self._hard_open_until = now + limit
            self._hard_open_timer = self.clock.call_later(
                limit, lambda: self._end_hard_open(f"upper bound of {limit:g} s reached")
            )
            event = RuntimeOverloaded(
                reason=f"{len(times)} rejections within {self.rejection_window:g} s",
                retry_after=self._overload_estimate(limit),
                rejections=len(times),
                max_duration=limit,
            )
            log.warning(event.message, status=event.kind)
            self.hub.emit(event)

    def _check_pressure(self) -> None:
        """After a task ended: end the hard open once the queue is below its low water."""
        if self._hard_open_until is None:
            return
        low_water = self._low_water()
        if self._queued < low_water:
            self._end_hard_open(
                f"queue down to {self._queued} (low-water mark {low_water}) and tasks finishing"
            )

    def _end_hard_open(self, reason: str) -> None:
        if self._hard_open_until is None:
            return
        self._hard_open_until = None
        if self._hard_open_timer is not None:
            self._hard_open_timer.cancel()
            self._hard_open_timer = None
        self._rejection_times.clear()
        event = RuntimeRecovered(
            overloaded_for=self.clock.monotonic() - self._hard_open_since, reason=reason
        )
        log.info(event.message, status=event.kind)
        self.hub.emit(event)

    def _shed_task(self, victim: TaskHandle, for_priority: Priority) -> None:
        retry = self._retry_estimate()
        error = QueueFullError(
            f"task {victim.id} ({victim.priority.name}) was shed from a full queue to make "
            f"room for a {for_priority.name} task; retry in {retry:.1f} s",
            reason="shed",
            retry_after=retry,
        )
        self._remove_queued(victim)
        self._finish(victim, TaskOutcome.SHED, error)

    def _report_capacity(self, capacity: int) -> None:
        previous = self._capacity_reported
        self._capacity_reported = capacity
        engine = self.runtime.active_engine
        if capacity < self.max_queue_size:
            reason = (
                f"{engine.name} can drain about {capacity} tasks within {self.max_queue_wait:g} s"
            )
        else:
            reason = "back to full capacity"
        event = QueueCapacityChanged(previous=previous, capacity=capacity, reason=reason)
        log.info(event.message, status=event.kind)
        self.hub.emit(event)

    def _on_event(self, event: Event) -> None:
        # Routing changed (breaker transitions): concurrency limits and capacity follow.
        if isinstance(event, BreakerStateChanged) and not self._closed:
            self.capacity()
            self._pump()

    # -- dispatch -------------------------------------------------------------------------

    def _pump(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Routing changed from outside the loop (a breaker reset() from plain code or
            # another thread): dispatch on the executor's loop as soon as it runs.
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._pump)
            return
        while self._queued:
            engine = self.runtime.active_engine
            # While degraded, every running task may end up on the fallback (a failed
            # primary call continues there), so all of them count against its limit.
            load = self._running if self.runtime.degraded else self._in_flight.get(engine.name, 0)
            if load >= self._limit(engine):
                return
            for queue in reversed(self._queues):  # CRITICAL first
                if queue:
                    self._start(loop, queue.popleft(), engine)
                    break
            else:  # pragma: no cover - counts and queues always agree
                return

    def _start(self, loop: asyncio.AbstractEventLoop, handle: TaskHandle, engine: Engine) -> None:
        self._queued -= 1
        if handle._queue_timer is not None:
            handle._queue_timer.cancel()
            handle._queue_timer = None
        now = self.clock.monotonic()
        handle.state = TaskState.RUNNING
        handle.started_at = now
        handle.start_order = next(self._order)
        handle.engine = engine.name
        self._waits.append(now - handle.submitted_at)
        self._in_flight[engine.name] = self._in_flight.get(engine.name, 0) + 1
        self._running += 1
        self._active.add(handle)
        runner = loop.create_task(self._run(handle))
        handle._runner = runner
        runner.add_done_callback(lambda _: self._runner_done(handle, engine.name))

    def _runner_done(self, handle: TaskHandle, engine: str) -> None:
        """Free the slot. Runs even if the runner was cancelled before it started."""
        if handle.outcome is None:
            reason = handle._cancel_reason
            if reason is not None:
                self._finish(handle, reason[0], reason[1])
            else:  # pragma: no cover - the loop is shutting down under us
                self._finish(handle, TaskOutcome.CANCELLED, _cancelled(handle, "event loop closed"))
        self._in_flight[engine] -= 1
        self._running -= 1
        self._active.discard(handle)
        if not self._closed:
            self._pump()
            self._check_pressure()

    async def _run(self, handle: TaskHandle) -> None:
        engine = handle.engine or ""
        try:
            stream = self.runtime.generate(handle.request)
            try:
                first = True
                async for chunk in stream:
                    if len(handle._buffer) >= self.stream_buffer:
                        await self._wait_for_space(handle)
                    handle._buffer.append(chunk)
                    handle._wake()
                    if first:
                        # Let the consumer take the first chunk now, even from an engine
                        # that never pauses: time to first token must not wait for the
                        # buffer to fill.
                        first = False
                        await asyncio.sleep(0)
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except asyncio.CancelledError:
            reason = handle._cancel_reason
            if reason is None:
                raise  # not ours (loop shutdown): let it propagate
            self._finish(handle, reason[0], reason[1])
        except _ConsumerGoneError:
            self._finish(
                handle,
                TaskOutcome.CANCELLED,
                _cancelled(handle, f"no chunk was read for {self.consumer_timeout:g} s"),
            )
        except Exception as exc:
            self._finish(handle, TaskOutcome.FAILED, exc)
        else:
            if self._finish(handle, TaskOutcome.COMPLETED, None) and handle.started_at is not None:
                elapsed = self.clock.monotonic() - handle.started_at
                previous = self._service.get(engine)
                self._service[engine] = (
                    elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
                )

    async def _wait_for_space(self, handle: TaskHandle) -> None:
        handle._space = asyncio.get_running_loop().create_future()
        try:
            async with timeout(self.clock, self.consumer_timeout):
                await handle._space
        except TimeoutError:
            raise _ConsumerGoneError from None
        finally:
            handle._space = None

    # -- ending tasks -------------------------------------------------------------------------

    def _remove_queued(self, handle: TaskHandle) -> None:
        self._queues[handle.priority].remove(handle)
        self._queued -= 1

    def _expire(self, handle: TaskHandle, phase: str, seconds: float) -> None:
        if phase == "queue":
            what = f"waited {seconds:g} s in the queue without starting"
            advice = "the runtime is overloaded; retry later or raise its priority"
        else:
            what = f"did not finish within its {seconds:g} s deadline"
            advice = "retry later or allow a longer deadline"
        error = TaskTimeoutError(f"task {handle.id} {what}; {advice}", phase=phase)
        self._cancel(handle, TaskOutcome.TIMED_OUT, error)

    def _cancel(self, handle: TaskHandle, outcome: TaskOutcome, error: BaseException) -> bool:
        if handle.outcome is not None:
            return False
        if handle.state is TaskState.QUEUED:
            self._remove_queued(handle)
            self._finish(handle, outcome, error)
            self._pump()
            return True
        handle._cancel_reason = (outcome, error)
        if handle._runner is not None:
            handle._runner.cancel()
        return True

    def _finish(
        self, handle: TaskHandle, outcome: TaskOutcome, error: BaseException | None
    ) -> bool:
        """Record the task's end, exactly once; returns False if it had already ended."""
        if handle.outcome is not None:
            return False
        handle.outcome = outcome
        handle.error = error
        handle.state = TaskState.DONE
        handle.finished_at = self.clock.monotonic()
        handle.end_order = next(self._order)
        for timer in (handle._queue_timer, handle._deadline_timer):
            if timer is not None:
                timer.cancel()
        handle._queue_timer = handle._deadline_timer = None
        if outcome is TaskOutcome.COMPLETED:
            self._completed += 1
        elif outcome is TaskOutcome.FAILED:
            self._failed += 1
        elif outcome is TaskOutcome.CANCELLED:
            self._cancelled += 1
        elif outcome is TaskOutcome.TIMED_OUT:
            self._timed_out += 1
        else:
            self._shed += 1
        handle._wake()
        space = handle._space
        if space is not None and not space.done():
            space.set_result(None)
        if handle._done is not None and not handle._done.done():
            handle._done.set_result(outcome)
        if outcome is not TaskOutcome.COMPLETED:
            # Per-task lines are debug: under overload they would flood the log; the
            # overloaded/recovered events and statistics() carry the summary.
            log.debug(
                "task ended",
                task_id=handle.id,
                outcome=outcome.value,
                priority=handle.priority.name,
                error=str(error) if error is not None else None,
            )
        return True

    def _running_handles(self) -> list[TaskHandle]:
        return list(self._active)

    def _runners(self) -> list[asyncio.Task[None]]:
        return [h._runner for h in self._active if h._runner is not None and not h._runner.done()]
