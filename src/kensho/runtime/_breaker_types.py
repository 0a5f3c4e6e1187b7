"""The circuit breaker's vocabulary: its states and the snapshots it reports.

Kept apart from the state machine (:mod:`kensho.runtime.breaker`, which re-exports
them) so that metrics and status code can read them without the machinery.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BreakerMetrics", "BreakerState", "FailureInfo"]


class BreakerState(enum.StrEnum):
    """Where a breaker stands; the values are what events, logs and metrics show."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class FailureInfo:
    """The last recorded failure: exception type name, message, clock time."""

    type: str
    message: str
    at: float


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """An immutable snapshot of a breaker, for monitoring and debugging.

    Counters are totals since creation (or the last :meth:`CircuitBreaker.reset`).
    ``failure_rate`` is over the sliding window, ``None`` while it holds fewer than
    ``minimum_calls`` calls (or when no window is configured). Times are in seconds
    of the breaker's clock; ``open_until`` is ``None`` unless the state is OPEN.
    """

    name: str
    state: BreakerState
    successes: int
    failures: int
    slow_calls: int
    timeouts: int
    rejections: int
    ignored: int
    consecutive_failures: int
    failure_rate: float | None
    window_calls: int
    transitions: int
    trips: int
    time_in_state: float
    open_until: float | None
    probes_in_flight: int
    last_failure: FailureInfo | None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (for ``/metrics`` and status endpoints)."""
        last = self.last_failure
        return {
            "name": self.name,
            "state": str(self.state),
            "successes": self.successes,
            "failures": self.failures,
            "slow_calls": self.slow_calls,
            "timeouts": self.timeouts,
            "rejections": self.rejections,
            "ignored": self.ignored,
            "consecutive_failures": self.consecutive_failures,
            "failure_rate": self.failure_rate,
            "window_calls": self.window_calls,
            "transitions": self.transitions,
            "trips": self.trips,
            "time_in_state": self.time_in_state,
            "open_until": self.open_until,
            "probes_in_flight": self.probes_in_flight,
            "last_failure": None
            if last is None
            else {"type": last.type, "message": last.message, "at": last.at},
        }
