"""One task of the executor: its priority, its handle, and its bounded chunk channel.

The :class:`TaskHandle` is the submitter's side (an async iterator of chunks and the
task's fate); the executor is the producer. They meet through two small interfaces,
so neither reaches into the other:

- the handle asks its owner to cancel it through :class:`TaskControl`
  (``cancel_task``), never through the executor's internals;
- the executor drives the handle through its lifecycle methods (:meth:`TaskHandle.start`,
  :meth:`~TaskHandle.request_cancel`, :meth:`~TaskHandle.settle`) and writes chunks
  into its :class:`ChunkChannel`, never into its fields.

The channel is bounded (``stream_buffer`` chunks): an engine faster than its reader
waits for space, and a reader that leaves the chunks unread for ``consumer_timeout``
seconds is considered gone, so a stalled client cannot hold an engine slot forever.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections import deque
from types import TracebackType
from typing import Protocol

from kensho.runtime.clock import Clock, TimerHandle, timeout
from kensho.runtime.engines.base import GenerationChunk, GenerationRequest, merge_chunks
from kensho.telemetry import OpenSpan, start_span

__all__ = [
    "ChunkChannel",
    "Priority",
    "TaskControl",
    "TaskHandle",
    "TaskOutcome",
    "TaskState",
]


class Priority(enum.IntEnum):
    """Task priority; higher values are served first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, text: str) -> Priority:
        """``"high"`` (any case, surrounding spaces allowed) -> ``Priority.HIGH``.

        Raises ``ValueError`` naming the accepted words, so the HTTP header and the
        CLI option refuse a bad value with the same message.
        """
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(p.name.lower() for p in sorted(cls, reverse=True))
            raise ValueError(f"{text!r} is not one of {choices}") from None


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


class TaskControl(Protocol):
    """What a handle may ask of the executor that owns it."""

    def cancel_task(self, handle: TaskHandle, reason: str) -> bool:
        """Cancel ``handle``'s task (queued or running); False if it had already ended."""


class ChunkChannel:
    """A bounded buffer of chunks from one producer (the runner) to one reader.

    :meth:`send` waits while the buffer is full; it returns False when the reader left
    the chunks unread for ``consumer_timeout`` seconds (on ``clock``).
    :meth:`send_nowait` is the fast path that never waits. :meth:`close`
    wakes both sides for good: the reader drains what is left, then sees the end.
    """

    __slots__ = ("_buffer", "_clock", "_closed", "_consumer_timeout", "_readable", "_space", "size")

    def __init__(self, size: int, *, clock: Clock, consumer_timeout: float | None) -> None:
        if size < 1:
            raise ValueError(f"stream_buffer must be >= 1, got {size}")
        self.size = size
        self._clock = clock
        self._consumer_timeout = consumer_timeout
        self._buffer: deque[GenerationChunk] = deque()
        self._readable: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._buffer)

    def send_nowait(self, chunk: GenerationChunk) -> bool:
        """Queue ``chunk`` if there is room now (anyio's ``send_nowait``); False: full."""
        if len(self._buffer) >= self.size and not self._closed:
            return False
        self._put(chunk)
        return True

    async def send(self, chunk: GenerationChunk) -> bool:
        """Queue ``chunk`` for the reader, waiting for space; False: the reader is gone."""
        if len(self._buffer) >= self.size and not self._closed:
            self._space = asyncio.get_running_loop().create_future()
            try:
                async with timeout(self._clock, self._consumer_timeout):
                    await self._space
            except TimeoutError:
                return False
            finally:
                self._space = None
        self._put(chunk)
        return True

    def _put(self, chunk: GenerationChunk) -> None:
        self._buffer.append(chunk)
        _resolve(self._readable)

    def take(self) -> GenerationChunk | None:
        """The oldest unread chunk, or None when none is buffered now.

        A reader that finds several chunks waiting is behind: it gets them merged
        into one (:func:`~kensho.runtime.engines.base.merge_chunks`), so catching up
        costs it one step rather than one per token.
        """
        buffer = self._buffer
        if not buffer:
            return None
        if len(buffer) > 1:
            merged = merge_chunks(buffer)
            buffer.clear()
            buffer.extend(merged)
        chunk = buffer.popleft()
        _resolve(self._space)
        return chunk

    async def readable(self) -> None:
        """Wait until a chunk is buffered or the channel is closed."""
        if self._buffer or self._closed:
            return
        self._readable = asyncio.get_running_loop().create_future()
        try:
            await self._readable
        finally:
            self._readable = None

    def close(self) -> None:
        """No more chunks will matter: wake a waiting reader and a waiting producer."""
        self._closed = True
        _resolve(self._readable)
        _resolve(self._space)


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


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
        "_cancel_reason",
        "_done",
        "_owner",
        "_runner",
        "_timers",
        "channel",
        "context",
        "end_order",
        "engine",
        "error",
        "finished_at",
        "id",
        "outcome",
        "priority",
        "queue_span",
        "request",
        "start_order",
        "started_at",
        "state",
        "submit_order",
        "submitted_at",
    )

    def __init__(
        self,
        owner: TaskControl,
        task_id: str,
        request: GenerationRequest,
        *,
        priority: Priority,
        now: float,
        order: int,
        channel: ChunkChannel,
    ) -> None:
        self._owner = owner
        self.id = task_id
        self.request = request
        self.priority = priority
        self.channel = channel
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
        self._done: asyncio.Future[TaskOutcome] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._timers: dict[str, TimerHandle] = {}  # "queue" and "total" deadlines
        self._cancel_reason: tuple[TaskOutcome, BaseException] | None = None
        # The submitter's context (request id, trace span): the runner task runs in
        # it, so its logs and spans belong to this request, not to whichever task
        # happened to free the slot.
        self.context = contextvars.copy_context()
        self.queue_span: OpenSpan = start_span(
            "kensho.queue_wait", **{"kensho.task_id": task_id, "kensho.priority": priority.name}
        )

    # -- submitter side ------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the task has ended (see :attr:`outcome`)."""
        return self.outcome is not None

    def cancel(self, reason: str = "cancelled by its submitter") -> bool:
        """Cancel the task (queued or running); False if it had already ended."""
        return self._owner.cancel_task(self, reason)

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
            chunk = self.channel.take()
            if chunk is not None:
                return chunk
            if self.outcome is not None:
                if self.outcome is TaskOutcome.COMPLETED or self.error is None:
                    raise StopAsyncIteration
                raise self.error
            await self.channel.readable()

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

    # -- executor side ---------------------------------------------------------------------

    @property
    def runner(self) -> asyncio.Task[None] | None:
        """The task running the request, once started."""
        return self._runner

    @property
    def cancel_reason(self) -> tuple[TaskOutcome, BaseException] | None:
        """Why the running task was asked to stop (:meth:`request_cancel`), if it was."""
        return self._cancel_reason

    def set_timer(self, phase: str, timer: TimerHandle) -> None:
        """Keep a deadline timer (``"queue"`` or ``"total"``); :meth:`settle` cancels it."""
        self._timers[phase] = timer

    def start(self, engine: str, *, now: float, order: int, runner: asyncio.Task[None]) -> None:
        """The task left the queue and runs on ``engine`` (its queue deadline is over)."""
        queue_timer = self._timers.pop("queue", None)
        if queue_timer is not None:
            queue_timer.cancel()
        self.state = TaskState.RUNNING
        self.started_at = now
        self.start_order = order
        self.engine = engine
        self._runner = runner
        self.queue_span.end(**{"kensho.engine": engine})

    def request_cancel(self, outcome: TaskOutcome, error: BaseException) -> None:
        """Stop the running task; its runner settles it with ``outcome`` and ``error``."""
        self._cancel_reason = (outcome, error)
        if self._runner is not None:
            self._runner.cancel()

    def settle(
        self, outcome: TaskOutcome, error: BaseException | None, *, now: float, order: int
    ) -> bool:
        """Record the task's end, exactly once (False if it had already ended), and
        wake whoever waits on it: the reader, a blocked producer, :meth:`wait`."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.error = error
        self.state = TaskState.DONE
        self.finished_at = now
        self.end_order = order
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.channel.close()
        self.queue_span.end(**{"kensho.outcome": outcome.value})  # never started
        if self._done is not None and not self._done.done():
            self._done.set_result(outcome)
        return True

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r}, {self.priority.name}, {self.state.value})"
