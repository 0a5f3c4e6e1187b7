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

This module owns the queues, the dispatch onto engine slots, deadlines and how each
task ends. The load decisions (capacity, service time, retry-after, hard open) are
in :mod:`kensho.runtime.admission`; the handle and its bounded chunk channel in
:mod:`kensho.runtime.task`.

::

    async with TaskExecutor(runtime) as executor:
        handle = executor.submit(request, priority=Priority.HIGH)
        async with handle:                 # leaving early cancels the task
            async for chunk in handle:
                ...
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from kensho.config import RuntimeSettings
from kensho.errors import QueueFullError, TaskTimeoutError
from kensho.events import BreakerStateChanged, Event
from kensho.hub import EventHub
from kensho.runtime.admission import Admission
from kensho.runtime.clock import AsyncioClock, Clock
from kensho.runtime.engines.base import Engine, GenerationChunk, GenerationRequest
from kensho.runtime.task import (
    ChunkChannel,
    Priority,
    TaskHandle,
    TaskOutcome,
    TaskState,
)
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


class Backend(Protocol):
    """What the executor runs tasks on: a :class:`~kensho.runtime.manager.RuntimeManager`."""

    @property
    def active_engine(self) -> Engine:
        """The engine new requests go to now (its concurrency limit applies)."""

    @property
    def degraded(self) -> bool:
        """True while running on the fallback engine."""

    @property
    def hub(self) -> EventHub:
        """Where the backend announces routing changes (breaker transitions): the
        executor re-plans on them, and publishes its own events there too."""

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


def _cancelled(handle: TaskHandle, reason: str) -> asyncio.CancelledError:
    return asyncio.CancelledError(f"task {handle.id} was cancelled: {reason}")


class TaskExecutor:
    """Bounded priority executor with shedding, deadlines and hard-open protection.

    ``concurrency`` maps engine names or kinds (``{"gpu": 4, "cpu": 1}``) to how many
    tasks may run on that engine at once (``default_concurrency`` for others), capped by
    an engine's own ``max_concurrency`` when it declares one.
    ``max_queue_wait`` is the default queue-wait deadline *and* the horizon for the
    dynamic capacity. ``stream_buffer`` chunks may wait for a consumer; a consumer
    that leaves them unread for ``consumer_timeout`` seconds is considered gone.

    ``rejection_threshold`` rejections within ``rejection_window`` seconds start a
    hard open; it ends when a task finishes with fewer than ``hard_open_low_water``
    x capacity tasks queued (at least: an empty queue), or after
    ``hard_open_duration`` seconds at most (:mod:`kensho.runtime.admission`).

    ``hub`` is the runtime's hub (the kernel passes the service's one hub to both);
    by default the executor uses ``runtime.hub``. Its events go there, and routing
    changes are read from there.
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
        if default_concurrency < 1 or any(v < 1 for v in (concurrency or {}).values()):
            raise ValueError("concurrency limits must be >= 1")
        if stream_buffer < 1:
            raise ValueError(f"stream_buffer must be >= 1, got {stream_buffer}")
        if hub is not None and hub is not runtime.hub:
            raise ValueError(
                "the executor must share its runtime's event hub (it re-plans on the "
                "runtime's breaker transitions there); pass the hub to both"
            )
        self.runtime = runtime
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self.concurrency = dict(concurrency or {})
        self.default_concurrency = default_concurrency
        self.stream_buffer = stream_buffer
        self.consumer_timeout = consumer_timeout
        self.hub: EventHub = runtime.hub
        self.admission = Admission(
            runtime,
            clock=self.clock,
            limit=self._limit,
            publish=self.hub.emit,
            max_queue_size=max_queue_size,
            min_queue_size=min_queue_size,
            max_queue_wait=max_queue_wait,
            dynamic_capacity=dynamic_capacity,
            rejection_threshold=rejection_threshold,
            rejection_window=rejection_window,
            hard_open_duration=hard_open_duration,
            hard_open_low_water=hard_open_low_water,
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
        self._waits: deque[float] = deque(maxlen=2048)
        self._accepted = self._completed = self._failed = self._cancelled = 0
        self._timed_out = self._shed = 0

    @classmethod
    def from_settings(
        cls,
        runtime: Backend,
        settings: RuntimeSettings,
        *,
        clock: Clock | None = None,
        hub: EventHub | None = None,
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
            hub=hub,
        )

    # -- settings held by admission ---------------------------------------------------------

    @property
    def max_queue_size(self) -> int:
        """The queue's capacity on the primary engine."""
        return self.admission.max_queue_size

    @property
    def max_queue_wait(self) -> float | None:
        """The default queue-wait deadline, and the dynamic capacity's horizon."""
        return self.admission.max_queue_wait

    @property
    def hard_open_duration(self) -> float:
        """The longest a hard open lasts (seconds)."""
        return self.admission.hard_open_duration

    @property
    def hard_open_low_water(self) -> float:
        """The fraction of the capacity the queue must fall below to end a hard open."""
        return self.admission.hard_open_low_water

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
        refusal = self.admission.refuse_overloaded(priority, self._queued)
        if refusal is not None:
            log.debug("task rejected", reason="overloaded", priority=priority.name)
            raise refusal
        capacity = self.capacity()
        tid = task_id or f"task-{next(self._ids)}"
        if self._queued >= capacity:
            victim = self._lowest_queued()
            if victim is None or victim.priority >= priority:
                log.debug(
                    "task rejected", reason="queue full", priority=priority.name, capacity=capacity
                )
                raise self.admission.refuse_full(priority, capacity, self._queued)
            self._shed_task(victim, priority)
        handle = self._enqueue(request, tid, priority)
        self._pump()
        self._arm_deadlines(handle, queue_timeout, deadline)  # no time passed since
        return handle

    def capacity(self) -> int:
        """The effective queue capacity now (smaller while on a slower engine)."""
        return self.admission.capacity()

    def running_on(self, engine: str) -> list[asyncio.Task[None]]:
        """The tasks running now that started on ``engine`` (a live reload waits for
        them: a stream finishes on the engine it started on)."""
        return [
            h.runner
            for h in self._active
            if h.engine == engine and h.runner is not None and not h.runner.done()
        ]

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
            rejected=self.admission.rejected,
            overloaded=self.admission.overloaded,
            wait_p50=pct(0.5),
            wait_p90=pct(0.9),
            wait_p99=pct(0.99),
        )

    @property
    def overloaded(self) -> bool:
        """True during a hard open (only CRITICAL tasks admitted)."""
        return self.admission.overloaded

    def cancel_task(self, handle: TaskHandle, reason: str) -> bool:
        """Cancel ``handle``'s task (queued or running); False if it had already ended.

        :meth:`TaskHandle.cancel` comes here (the handle's :class:`TaskControl`).
        """
        return self._cancel(handle, TaskOutcome.CANCELLED, _cancelled(handle, reason))

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
                self.cancel_task(handle, "executor shut down")
        for handle in list(self._active):
            self.cancel_task(handle, "executor shut down")
        runners = self._runners()
        if runners:
            await asyncio.wait(runners)
        self.admission.close()
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
        limit = limits.get(engine.name) or limits.get(engine.kind) or self.default_concurrency
        # An engine may declare how many sequences it can run at once (llama.cpp: one);
        # the settings can lower that, never raise it.
        ceiling: int | None = getattr(engine, "max_concurrency", None)
        return min(limit, ceiling) if ceiling else limit

    def _lowest_queued(self) -> TaskHandle | None:
        for queue in self._queues:  # LOW first
            if queue:
                # The newest of the lowest level: it has waited least, so loses least.
                return queue[-1]
        return None

    def _shed_task(self, victim: TaskHandle, for_priority: Priority) -> None:
        retry = self.admission.retry_estimate(self._queued)
        error = QueueFullError(
            f"task {victim.id} ({victim.priority.name}) was shed from a full queue to make "
            f"room for a {for_priority.name} task; retry in {retry:.1f} s",
            reason="shed",
            retry_after=retry,
        )
        self._remove_queued(victim)
        self._finish(victim, TaskOutcome.SHED, error)

    def _enqueue(self, request: GenerationRequest, task_id: str, priority: Priority) -> TaskHandle:
        channel = ChunkChannel(
            self.stream_buffer, clock=self.clock, consumer_timeout=self.consumer_timeout
        )
        handle = TaskHandle(
            self,
            task_id,
            request,
            priority=priority,
            now=self.clock.monotonic(),
            order=next(self._order),
            channel=channel,
        )
        self._accepted += 1
        self._queues[priority].append(handle)
        self._queued += 1
        return handle

    def _arm_deadlines(
        self, handle: TaskHandle, queue_timeout: float | None, deadline: float | None
    ) -> None:
        wait = self.max_queue_wait
        if queue_timeout is not None:  # may only lower the executor's bound (as Triton)
            wait = queue_timeout if wait is None else min(wait, queue_timeout)
        # A task that started at once never waits: no queue timer to arm and cancel.
        if wait is not None and handle.state is TaskState.QUEUED:
            timer = self.clock.call_later(wait, lambda: self._expire(handle, "queue", wait))
            handle.set_timer("queue", timer)
        if deadline is not None:
            timer = self.clock.call_later(deadline, lambda: self._expire(handle, "total", deadline))
            handle.set_timer("total", timer)

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
        now = self.clock.monotonic()
        runner = loop.create_task(self._run(handle), context=handle.context)
        handle.start(engine.name, now=now, order=next(self._order), runner=runner)
        self._waits.append(now - handle.submitted_at)
        self._in_flight[engine.name] = self._in_flight.get(engine.name, 0) + 1
        self._running += 1
        self._active.add(handle)
        runner.add_done_callback(lambda _: self._runner_done(handle, engine.name))

    def _runner_done(self, handle: TaskHandle, engine: str) -> None:
        """Free the slot. Runs even if the runner was cancelled before it started."""
        if handle.outcome is None:
            reason = handle.cancel_reason
            if reason is not None:
                self._finish(handle, reason[0], reason[1])
            else:  # pragma: no cover - the loop is shutting down under us
                self._finish(handle, TaskOutcome.CANCELLED, _cancelled(handle, "event loop closed"))
        self._in_flight[engine] -= 1
        self._running -= 1
        self._active.discard(handle)
        if not self._closed:
            self._pump()
            self.admission.task_finished(self._queued)

    async def _run(self, handle: TaskHandle) -> None:
        try:
            await self._relay(handle)
        except asyncio.CancelledError:
            reason = handle.cancel_reason
            if reason is None:
                raise  # not ours (loop shutdown): let it propagate
            self._finish(handle, reason[0], reason[1])
        except Exception as exc:
            self._finish(handle, TaskOutcome.FAILED, exc)

    async def _relay(self, handle: TaskHandle) -> None:
        """Copy the runtime's chunks into the handle's channel, then settle the task."""
        stream = self.runtime.generate(handle.request)
        channel = handle.channel
        reader_gone = False
        try:
            first = True
            async for chunk in stream:
                if not channel.send_nowait(chunk) and not await channel.send(chunk):
                    reader_gone = True
                    break
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
        if reader_gone:
            gone = _cancelled(handle, f"no chunk was read for {self.consumer_timeout:g} s")
            self._finish(handle, TaskOutcome.CANCELLED, gone)
        elif self._finish(handle, TaskOutcome.COMPLETED, None) and handle.started_at is not None:
            assert handle.engine is not None
            self.admission.record_service(handle.engine, self.clock.monotonic() - handle.started_at)

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
        handle.request_cancel(outcome, error)
        return True

    def _finish(
        self, handle: TaskHandle, outcome: TaskOutcome, error: BaseException | None
    ) -> bool:
        """Record the task's end, exactly once; returns False if it had already ended."""
        if not handle.settle(outcome, error, now=self.clock.monotonic(), order=next(self._order)):
            return False
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

    def _runners(self) -> list[asyncio.Task[None]]:
        return [h.runner for h in self._active if h.runner is not None and not h.runner.done()]
