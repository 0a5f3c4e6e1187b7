"""The status stream (``GET /v1/kensho/status``) and what it reports: :class:`StatusSnapshot`.

The :class:`StatusBoard` reads the components' own snapshots (runtime metrics,
executor statistics, integrity, the request-path counters of ``/metrics``) when asked,
so it can never drift from them. It also keeps each breaker's last transition: the
event history is bounded, and an operator opening the page an hour after the GPU
failed must still read when and why.

The stream itself (:func:`add_status_route`) is the hub's own
:meth:`~kensho.hub.EventHub.stream` (recent history replayed, a slow client losing the
oldest events), with a snapshot every :data:`SNAPSHOT_INTERVAL` and a final
``shutdown`` event when the server stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import Counter, Histogram

from kensho.events import (
    BreakerChange,
    BreakerSnapshot,
    BreakerStateChanged,
    Event,
    IntegritySnapshot,
    QueueSnapshot,
    ServerShutdown,
    StatusSnapshot,
    TrafficSnapshot,
)
from kensho.runtime.breaker import BreakerMetrics
from kensho.server._context import ServerContext
from kensho.server._metrics import ServerMetrics
from kensho.server._sse import SSE_HEADERS, sse_event

__all__ = ["SNAPSHOT_INTERVAL", "STATUS_BUFFER", "StatusBoard", "add_status_route"]

#: Seconds between two snapshots on an idle status stream (queue depth, rates).
SNAPSHOT_INTERVAL = 1.0
#: Events one status client may fall behind by before it loses the oldest.
STATUS_BUFFER = 256


class StatusBoard:
    """Builds snapshots of one server and remembers the breakers' last transitions."""

    def __init__(self, context: ServerContext, metrics: ServerMetrics) -> None:
        self.context = context
        self._metrics = metrics
        self._changes: dict[str, BreakerChange] = {}
        for past in context.hub.history:
            self._remember(past)
        context.hub.add_listener(self._remember)

    def _remember(self, event: Event) -> None:
        if isinstance(event, BreakerStateChanged):
            self._changes[event.breaker] = BreakerChange(
                from_state=event.from_state,
                to_state=event.to_state,
                reason=event.reason,
                ts=event.ts,
            )

    def _breaker(self, b: BreakerMetrics) -> BreakerSnapshot:
        return BreakerSnapshot(
            name=b.name,
            state=str(b.state),
            transitions=b.transitions,
            trips=b.trips,
            failure_rate=b.failure_rate,
            last_change=self._changes.get(b.name),
        )

    def snapshot(self) -> StatusSnapshot:
        """The state now; cheap enough to build every second per open stream."""
        ctx = self.context
        runtime = ctx.runtime.metrics()
        stats = ctx.executor.statistics()
        breakers = [b for b in (runtime.primary, runtime.fallback) if b is not None]
        integrity = ctx.integrity
        return StatusSnapshot(
            model=ctx.model_id,
            engines=tuple(b.name for b in breakers),
            active_engine=runtime.active_engine,
            degraded=runtime.degraded,
            overloaded=stats.overloaded,
            draining=ctx.draining,
            breakers=tuple(self._breaker(b) for b in breakers),
            queue=QueueSnapshot(
                depth=dict(stats.queued),
                capacity=stats.capacity,
                max_queue_size=stats.max_queue_size,
                in_flight=dict(stats.in_flight),
            ),
            tasks={
                "completed": stats.completed,
                "failed": stats.failed,
                "cancelled": stats.cancelled,
                "timed_out": stats.timed_out,
                "shed": stats.shed,
                "rejected": stats.rejected,
            },
            traffic=TrafficSnapshot(
                tokens=_total(self._metrics.tokens),
                completions=int(_total(self._metrics.latency, "_count")),
                latency_seconds=_total(self._metrics.latency, "_sum"),
            ),
            integrity=IntegritySnapshot(
                status=integrity.status,
                files=dict(integrity.files),
                problems=dict(integrity.problems),
                offline=integrity.offline,
                checked_at=integrity.checked_at,
            ),
            release=ctx.release() if ctx.release is not None else None,
        )


def _total(instrument: Counter | Histogram, suffix: str = "_total") -> float:
    """The sum over every label of one sample kind (``_total``, ``_sum``, ``_count``)."""
    return sum(
        sample.value
        for family in instrument.collect()
        for sample in family.samples
        if sample.name.endswith(suffix)
    )


def add_status_route(app: FastAPI, board: StatusBoard) -> None:
    """``GET /v1/kensho/status``: server-sent events of one server's state."""

    @app.get("/v1/kensho/status")
    async def status_stream() -> StreamingResponse:
        """Server-sent events: a snapshot (and again every second: queue depth,
        counters), integrity, breaker and overload events as they happen."""
        return StreamingResponse(
            _status_events(board), media_type="text/event-stream", headers=SSE_HEADERS
        )


async def _status_events(board: StatusBoard) -> AsyncIterator[bytes]:
    """Snapshots on a timer, the hub's events between them, ``shutdown`` at the end.

    The hub stream is read by one pending ``anext`` at a time, kept across snapshot
    ticks (cancelling it would end the subscription). Cleanup needs no await that
    suspends, which matters when the client's disconnect cancels this generator.
    """
    ctx = board.context
    # An async generator (annotated as an iterator by the hub): closed below.
    events = cast(AsyncGenerator[Event, None], ctx.hub.stream(buffer=STATUS_BUFFER, replay=True))
    stopping: asyncio.Future[Any] = asyncio.ensure_future(ctx.stopping.wait())
    getter: asyncio.Future[Any] | None = None
    try:
        loop = asyncio.get_running_loop()
        yield sse_event(board.snapshot().to_dict(), kind="snapshot")
        due = loop.time() + SNAPSHOT_INTERVAL
        while True:
            if getter is None:
                getter = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait(
                {getter, stopping},
                timeout=max(0.0, due - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if stopping in done:
                yield sse_event(ServerShutdown().to_dict(), kind="shutdown")
                return
            if getter in done:
                event: Event = getter.result()
                getter = None
                yield sse_event(event.to_dict(), kind=event.kind)
            if loop.time() >= due:  # the state now, events flowing or not
                yield sse_event(board.snapshot().to_dict(), kind="snapshot")
                due = loop.time() + SNAPSHOT_INTERVAL
    finally:
        stopping.cancel()
        if getter is not None and not getter.done():
            getter.cancel()  # ends the hub stream inside the getter's task
        else:
            await events.aclose()  # suspended at a yield (or never started): closes at once
