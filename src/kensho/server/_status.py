"""What the status stream and the dashboard report: one :class:`StatusSnapshot`.

The :class:`StatusBoard` reads the components' own snapshots (runtime metrics,
executor statistics, integrity, the request-path counters of ``/metrics``) when asked,
so it can never drift from them. It also keeps each breaker's last transition: the
event history is bounded, and an operator opening the page an hour after the GPU
failed must still read when and why.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from kensho.events import (
    BreakerChange,
    BreakerSnapshot,
    BreakerStateChanged,
    Event,
    IntegritySnapshot,
    QueueSnapshot,
    StatusSnapshot,
    TrafficSnapshot,
)
from kensho.runtime.breaker import BreakerMetrics
from kensho.server._context import ServerContext
from kensho.server._metrics import ServerMetrics

__all__ = ["SNAPSHOT_INTERVAL", "StatusBoard"]

#: Seconds between two snapshots on an idle status stream (queue depth, rates).
SNAPSHOT_INTERVAL = 1.0


class StatusBoard:
    """Builds snapshots of one server and remembers the breakers' last transitions."""

    def __init__(self, context: ServerContext, metrics: ServerMetrics) -> None:
        self._context = context
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
        ctx = self._context
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
        )


def _total(instrument: Counter | Histogram, suffix: str = "_total") -> float:
    """The sum over every label of one sample kind (``_total``, ``_sum``, ``_count``)."""
    return sum(
        sample.value
        for family in instrument.collect()
        for sample in family.samples
        if sample.name.endswith(suffix)
    )
