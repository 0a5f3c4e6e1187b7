"""Admission: how many tasks the executor takes now, and what it tells those it refuses.

The executor owns the queues and the dispatch; this module owns the decisions about
load, so they can be read (and tuned) in one place:

- **dynamic capacity** — while the runtime runs on the slower engine, the effective
  queue capacity shrinks to what that engine can drain within ``max_queue_wait``
  (measured throughput), and grows back after recovery: the roadmap's "dynamic
  MAX_QUEUE_SIZE". Real changes (10 % or a return to full) are announced as
  ``executor.capacity_changed`` events;
- **service time** — an exponentially weighted average of seconds per task, by
  engine (a prior of 1 s per task until one has completed there);
- **retry-after** — when a refused request would be admitted: once the queue ahead of
  it has started, from the measured service time, never a fixed cool-down;
- **hard open** — sustained rejection (``rejection_threshold`` within
  ``rejection_window`` s) admits only CRITICAL tasks until the pressure ends. Like
  Envoy's overload manager it is a state of the load, not a cool-down: it ends as
  soon as a task finishes with the queue below its low-water mark
  (``hard_open_low_water`` of the capacity), ``hard_open_duration`` s at most;
  announced as ``executor.overloaded`` then ``executor.recovered``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from kensho.errors import QueueFullError
from kensho.events import Event, QueueCapacityChanged, RuntimeOverloaded, RuntimeRecovered
from kensho.runtime.clock import Clock, TimerHandle
from kensho.runtime.engines.base import Engine
from kensho.runtime.task import Priority

__all__ = ["Admission", "Routing"]

# The service time assumed for an engine on which no task has completed yet.
_UNMEASURED_SERVICE = 1.0
# The shortest retry-after ever suggested: retrying sooner would only be refused again.
_MIN_RETRY = 0.1
# Weight of the newest task in the service-time average.
_SERVICE_WEIGHT = 0.2


class Routing(Protocol):
    """Where new tasks would run now (a runtime manager)."""

    @property
    def active_engine(self) -> Engine:
        """The engine new requests go to now."""

    @property
    def degraded(self) -> bool:
        """True while running on the fallback engine."""


class Admission:
    """Capacity, service times, retry-after estimates and the hard open of one executor.

    ``limit(engine)`` is how many tasks may run on ``engine`` at once; ``publish``
    receives the capacity and overload events. Queue depths are passed in by the
    executor, which owns the queues.
    """

    def __init__(
        self,
        routing: Routing,
        *,
        clock: Clock,
        limit: Callable[[Engine], int],
        publish: Callable[[Event], object],
        max_queue_size: int,
        min_queue_size: int,
        max_queue_wait: float | None,
        dynamic_capacity: bool,
        rejection_threshold: int,
        rejection_window: float,
        hard_open_duration: float,
        hard_open_low_water: float,
    ) -> None:
        if max_queue_size < 1 or min_queue_size < 1 or min_queue_size > max_queue_size:
            raise ValueError("need 1 <= min_queue_size <= max_queue_size")
        if rejection_threshold < 1 or rejection_window <= 0 or hard_open_duration <= 0:
            raise ValueError("rejection_threshold >= 1, window and duration > 0 required")
        if not 0 < hard_open_low_water <= 1:
            raise ValueError(
                f"hard_open_low_water is a fraction of the queue capacity in (0, 1], "
                f"got {hard_open_low_water}"
            )
        self._routing = routing
        self._clock = clock
        self._limit = limit
        self._publish = publish
        self.max_queue_size = max_queue_size
        self.min_queue_size = min_queue_size
        self.max_queue_wait = max_queue_wait
        self.dynamic_capacity = dynamic_capacity
        self.rejection_threshold = rejection_threshold
        self.rejection_window = rejection_window
        self.hard_open_duration = hard_open_duration
        self.hard_open_low_water = hard_open_low_water
        self.rejected = 0
        self._service: dict[str, float] = {}  # EWMA of seconds per task, by engine
        self._rejection_times: deque[float] = deque()
        self._hard_open_until: float | None = None
        self._hard_open_since = 0.0
        self._hard_open_timer: TimerHandle | None = None
        self._capacity_reported = max_queue_size

    # -- capacity and service time -----------------------------------------------------

    def capacity(self) -> int:
        """The effective queue capacity now (smaller while on a slower engine)."""
        capacity = self.max_queue_size
        if self.dynamic_capacity and self.max_queue_wait is not None and self._routing.degraded:
            engine = self._routing.active_engine
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

    def record_service(self, engine: str, seconds: float) -> None:
        """A task completed on ``engine`` in ``seconds``: update its average."""
        previous = self._service.get(engine)
        self._service[engine] = (
            seconds
            if previous is None
            else (1 - _SERVICE_WEIGHT) * previous + _SERVICE_WEIGHT * seconds
        )

    def _report_capacity(self, capacity: int) -> None:
        previous = self._capacity_reported
        self._capacity_reported = capacity
        engine = self._routing.active_engine
        if capacity < self.max_queue_size:
            reason = (
                f"{engine.name} can drain about {capacity} tasks within {self.max_queue_wait:g} s"
            )
        else:
            reason = "back to full capacity"
        self._publish(QueueCapacityChanged(previous=previous, capacity=capacity, reason=reason))

    # -- retry-after estimates -----------------------------------------------------------

    def _seconds_per_start(self) -> float:
        """How often a queued task starts on the active engine: service time / slots."""
        engine = self._routing.active_engine
        service = self._service.get(engine.name)
        if service is None or service <= 0:
            service = _UNMEASURED_SERVICE
        return service / self._limit(engine)

    def retry_estimate(self, queued: int) -> float:
        """When a refused task would get in: once the ``queued`` tasks ahead have started."""
        return max(_MIN_RETRY, (queued + 1) * self._seconds_per_start())

    def _low_water(self) -> int:
        """The queue depth the hard open waits for: below it, the pressure has ended."""
        return max(1, math.ceil(self.capacity() * self.hard_open_low_water))

    def _overload_estimate(self, queued: int, remaining: float) -> float:
        """When the hard open should end: the queue drained below the low-water mark
        (one finished task at least), or ``remaining`` s at most."""
        starts = max(1, queued - self._low_water() + 1)
        return max(0.0, min(remaining, max(_MIN_RETRY, starts * self._seconds_per_start())))

    # -- refusals ------------------------------------------------------------------------

    def refuse_overloaded(self, priority: Priority, queued: int) -> QueueFullError | None:
        """During a hard open, the refusal for a non-CRITICAL task; else None."""
        until = self._hard_open_until
        if until is None or priority >= Priority.CRITICAL:
            return None
        self.rejected += 1
        retry = self._overload_estimate(queued, until - self._clock.monotonic())
        return QueueFullError(
            f"overloaded: only CRITICAL tasks are accepted until the queue drains "
            f"({queued} tasks waiting) after sustained rejections; retry "
            f"{priority.name} work in {retry:.1f} s",
            reason="overloaded",
            retry_after=retry,
        )

    def refuse_full(self, priority: Priority, capacity: int, queued: int) -> QueueFullError:
        """The refusal for a task that finds the queue full of equal or higher priority
        work; counts towards a hard open."""
        self.rejected += 1
        retry = self.retry_estimate(queued)
        reduced = (
            f", reduced from {self.max_queue_size} while on {self._routing.active_engine.name}"
            if capacity < self.max_queue_size
            else ""
        )
        self._count_rejection(queued)
        return QueueFullError(
            f"too many requests: the queue is full ({queued} tasks waiting, capacity "
            f"{capacity}{reduced}) and holds nothing of lower priority than "
            f"{priority.name}; retry in {retry:.1f} s",
            reason="rejected",
            retry_after=retry,
        )

    # -- hard open -------------------------------------------------------------------------

    @property
    def overloaded(self) -> bool:
        """True during a hard open (only CRITICAL tasks admitted)."""
        return self._hard_open_until is not None

    def _count_rejection(self, queued: int) -> None:
        now = self._clock.monotonic()
        times = self._rejection_times
        times.append(now)
        while times and times[0] <= now - self.rejection_window:
            times.popleft()
        if len(times) >= self.rejection_threshold and self._hard_open_until is None:
            limit = self.hard_open_duration
            self._hard_open_since = now
            self._hard_open_until = now + limit
            self._hard_open_timer = self._clock.call_later(
                limit, lambda: self.end_hard_open(f"upper bound of {limit:g} s reached")
            )
            self._publish(
                RuntimeOverloaded(
                    reason=f"{len(times)} rejections within {self.rejection_window:g} s",
                    retry_after=self._overload_estimate(queued, limit),
                    rejections=len(times),
                    max_duration=limit,
                )
            )

    def task_finished(self, queued: int) -> None:
        """After a task ended: end the hard open once the queue is below its low water."""
        if self._hard_open_until is None:
            return
        low_water = self._low_water()
        if queued < low_water:
            self.end_hard_open(
                f"queue down to {queued} (low-water mark {low_water}) and tasks finishing"
            )

    def end_hard_open(self, reason: str) -> None:
        """Admit every priority again (announced with ``reason``); no-op if not open."""
        if self._hard_open_until is None:
            return
        self._hard_open_until = None
        self.close()
        self._rejection_times.clear()
        self._publish(
            RuntimeRecovered(
                overloaded_for=self._clock.monotonic() - self._hard_open_since, reason=reason
            )
        )

    def close(self) -> None:
        """Stop the hard open's timer (the executor shuts down)."""
        if self._hard_open_timer is not None:
            self._hard_open_timer.cancel()
            self._hard_open_timer = None
