"""Events of the runtime: breakers, engine failover and the executor's admission."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kensho.events._base import Event

__all__ = [
    "BreakerStateChanged",
    "FallbackActivated",
    "PrimaryProbeFailed",
    "PrimaryProbing",
    "PrimaryRestored",
    "QueueCapacityChanged",
    "RequestRerouted",
    "RuntimeAvailable",
    "RuntimeOverloaded",
    "RuntimeRecovered",
    "RuntimeUnavailable",
]


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStateChanged(Event):
    """A circuit breaker moved from one state to another (``open_for`` when it opened)."""

    kind: ClassVar[str] = "breaker.state_changed"
    breaker: str
    from_state: str
    to_state: str
    reason: str
    open_for: float | None = None

    @property
    def message(self) -> str:
        text = f"breaker {self.breaker}: {self.from_state} -> {self.to_state} ({self.reason})"
        if self.open_for is not None:
            text += f", next test in {_seconds(self.open_for)}"
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackActivated(Event):
    """The primary engine's breaker opened: requests now go to the fallback engine."""

    kind: ClassVar[str] = "runtime.fallback_activated"
    log_level: ClassVar[str | None] = "warning"
    primary: str
    fallback: str
    reason: str
    retry_in: float | None = None
    permanent: bool = False

    @property
    def message(self) -> str:
        if self.permanent:
            return (
                f"{self.primary} unavailable on this machine, serving on {self.fallback} "
                "(degraded performance)"
            )
        return f"{self.primary} failing, switched to {self.fallback} (degraded performance)"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrimaryProbing(Event):
    """The open period ended: the next request(s) test the primary engine."""

    kind: ClassVar[str] = "runtime.primary_probing"
    log_level: ClassVar[str | None] = "info"
    primary: str

    @property
    def message(self) -> str:
        return f"testing {self.primary}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrimaryProbeFailed(Event):
    """A test request on the primary failed: stay on the fallback for ``retry_in`` s."""

    kind: ClassVar[str] = "runtime.primary_probe_failed"
    log_level: ClassVar[str | None] = "warning"
    primary: str
    fallback: str
    reason: str
    retry_in: float | None = None

    @property
    def message(self) -> str:
        text = f"{self.primary} still failing, staying on {self.fallback}"
        if self.retry_in is not None:
            text += f"; next test in {_seconds(self.retry_in)}"
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class PrimaryRestored(Event):
    """The primary engine passed its tests: requests go back to it."""

    kind: ClassVar[str] = "runtime.primary_restored"
    log_level: ClassVar[str | None] = "info"
    primary: str

    @property
    def message(self) -> str:
        return f"{self.primary} restored"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRerouted(Event):
    """One request failed on an engine and was served (or continued) by another."""

    kind: ClassVar[str] = "runtime.request_rerouted"
    log_level: ClassVar[str | None] = "warning"
    request_id: str
    from_engine: str
    to_engine: str
    reason: str
    tokens_done: int = 0

    @property
    def message(self) -> str:
        where = f"after {self.tokens_done} tokens" if self.tokens_done else "before any token"
        return (
            f"request {self.request_id}: {self.from_engine} failed {where} "
            f"({self.reason}), continued on {self.to_engine}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeUnavailable(Event):
    """No engine can serve requests right now; they are refused with a retry-after."""

    kind: ClassVar[str] = "runtime.unavailable"
    log_level: ClassVar[str | None] = "error"
    reason: str
    retry_after: float

    @property
    def message(self) -> str:
        return f"no engine available ({self.reason}); retry in {_seconds(self.retry_after)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeAvailable(Event):
    """After a time with no engine, ``engine`` serves again (``degraded``: the fallback)."""

    kind: ClassVar[str] = "runtime.available"
    log_level: ClassVar[str | None] = "info"
    engine: str
    degraded: bool
    unavailable_for: float

    @property
    def message(self) -> str:
        text = f"{self.engine} recovered after {_seconds(self.unavailable_for)} with no engine"
        if self.degraded:
            return f"{text}: serving on {self.engine} (degraded performance)"
        return f"{text}: serving normally"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueCapacityChanged(Event):
    """The executor's effective queue capacity changed (dynamic MAX_QUEUE_SIZE)."""

    kind: ClassVar[str] = "executor.capacity_changed"
    log_level: ClassVar[str | None] = "info"
    previous: int
    capacity: int
    reason: str

    @property
    def message(self) -> str:
        return f"queue capacity {self.previous} -> {self.capacity} ({self.reason})"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeOverloaded(Event):
    """Sustained rejections: only CRITICAL tasks are admitted until the queue drains.

    ``retry_after`` estimates when that will be (from the measured service time);
    ``max_duration``, when set, is the upper bound (``hard_open_duration``).
    """

    kind: ClassVar[str] = "executor.overloaded"
    log_level: ClassVar[str | None] = "warning"
    reason: str
    retry_after: float
    rejections: int
    max_duration: float | None = None

    @property
    def message(self) -> str:
        if self.max_duration is None:
            until = f"for {_seconds(self.retry_after)}"
        else:
            until = (
                f"until the queue drains (about {_seconds(self.retry_after)}, "
                f"at most {_seconds(self.max_duration)})"
            )
        return f"overloaded ({self.reason}): only critical tasks accepted {until}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeRecovered(Event):
    """The overload ended (``reason``: why): every priority is admitted again."""

    kind: ClassVar[str] = "executor.recovered"
    log_level: ClassVar[str | None] = "info"
    overloaded_for: float
    reason: str = ""

    @property
    def message(self) -> str:
        took = _seconds(self.overloaded_for)
        why = f" ({self.reason})" if self.reason else ""
        return f"recovered after {took} overloaded{why}: accepting all tasks again"
