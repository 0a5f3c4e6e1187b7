"""Events of the server's status stream: the whole-state snapshot and the shutdown."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from kensho.events._base import Event
from kensho.events.release import ReleaseSnapshot

# --- the status stream: snapshot and shutdown ------------------------------------------
#
# ``GET /v1/kensho/status`` sends ``event: <kind>`` + ``data: <json>`` pairs: a
# ``snapshot`` first and then every second (queue depth, counters), the events above
# as they happen, and ``shutdown`` at the end. Every reader (``kensho status``, the
# tests; the dashboard reads the same field names) decodes them with
# :func:`kensho.events.decode_event`, through the
# same dataclasses the server encodes with, so a renamed field is a decoding error
# that names the field instead of a view that silently shows ``None``.

__all__ = [
    "BreakerChange",
    "BreakerSnapshot",
    "IntegritySnapshot",
    "QueueSnapshot",
    "ServerShutdown",
    "StatusSnapshot",
    "TrafficSnapshot",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerChange:
    """A breaker's last transition, kept by the server so a late viewer still sees it."""

    from_state: str
    to_state: str
    reason: str
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSnapshot:
    """One breaker: its state now, how often it moved, and its last transition."""

    name: str
    state: str
    transitions: int
    trips: int
    failure_rate: float | None
    last_change: BreakerChange | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSnapshot:
    """Waiting tasks per priority (``CRITICAL`` … ``LOW``), capacity, running per engine."""

    depth: dict[str, int]
    capacity: int
    max_queue_size: int
    in_flight: dict[str, int]

    @property
    def waiting(self) -> int:
        """Tasks waiting, every priority together."""
        return sum(self.depth.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class IntegritySnapshot:
    """The store's last verification (``ok``, ``degraded``, ``failed``, ``unverified``)."""

    status: str
    files: dict[str, int]
    problems: dict[str, str]
    offline: bool
    checked_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficSnapshot:
    """Totals since start: a viewer turns two snapshots into tokens/s and latency."""

    tokens: float
    completions: int
    latency_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusSnapshot(Event):
    """The whole state of a server at ``ts``: the first (and periodic) stream event."""

    kind: ClassVar[str] = "snapshot"
    model: str
    engines: tuple[str, ...]
    active_engine: str
    degraded: bool
    overloaded: bool
    draining: bool
    breakers: tuple[BreakerSnapshot, ...]
    queue: QueueSnapshot
    tasks: dict[str, int]
    traffic: TrafficSnapshot
    integrity: IntegritySnapshot
    release: ReleaseSnapshot | None = None  # None: no store behind this server

    @property
    def message(self) -> str:
        states = ", ".join(f"{b.name} {b.state}" for b in self.breakers)
        return (
            f"{self.model} on {self.active_engine} ({states}); {self.queue.waiting} waiting "
            f"of {self.queue.capacity}; integrity {self.integrity.status}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Nested parts as plain dicts too (the base class keeps values as they are)."""
        data = Event.to_dict(self)
        for name in ("queue", "traffic", "integrity"):
            data[name] = dataclasses.asdict(getattr(self, name))
        data["breakers"] = [dataclasses.asdict(b) for b in self.breakers]
        data["release"] = dataclasses.asdict(self.release) if self.release else None
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerShutdown(Event):
    """The server is shutting down: the stream ends after this event."""

    kind: ClassVar[str] = "shutdown"

    @property
    def message(self) -> str:
        return "server shutting down"
