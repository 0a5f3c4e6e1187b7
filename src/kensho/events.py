"""Status events shared by all components.

Events are data: frozen dataclasses with a ``kind`` and a JSON-serialisable
``to_dict()``. Components yield them; the CLI renders them as progress bars or
tables, the logger writes them as JSON lines, the HTTP server streams them as
server-sent events. No component formats user text for another, except the one-line
``message`` every event carries for humans.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Event"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every status event; ``ts`` is a wall-clock UNIX timestamp.

    ``log_level`` is the level the hub's log listener writes the event at
    (``kensho.hub.log_event``); ``None``: the event is not logged by the hub (its
    source logs it, or it is progress that would flood the log).
    """

    kind: ClassVar[str] = "event"
    log_level: ClassVar[str | None] = None
    ts: float = field(default_factory=time.time)

    @property
    def message(self) -> str:
        """A one-line human summary; subclasses override it."""
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON-ready data: ``kind``, ``message`` and every field."""
        data: dict[str, Any] = {"kind": self.kind, "message": self.message}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data


# --- storage events (integrity store) ----------------------------------------------

__all__ += [
    "StorageChunkRejected",
    "StorageDownloadProgress",
    "StorageFileChecked",
    "StorageFileRepaired",
    "StorageHashProgress",
    "StorageLockWaiting",
    "StorageReady",
    "StorageRepairFailed",
    "StorageRepairStarted",
    "StorageSourceFailed",
    "StorageVerifyFinished",
    "StorageVerifyStarted",
]


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageVerifyStarted(Event):
    """Verification of a store began; ``full`` means every file is re-hashed."""

    kind: ClassVar[str] = "storage.verify.started"
    root: str
    files: int
    total_bytes: int
    full: bool

    @property
    def message(self) -> str:
        how = "full" if self.full else "fast"
        return f"verifying {self.files} files ({_bytes(self.total_bytes)}) in {self.root} ({how})"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageHashProgress(Event):
    """Bytes of one large file hashed so far (one event per chunk)."""

    kind: ClassVar[str] = "storage.hash.progress"
    path: str
    done: int
    total: int

    @property
    def message(self) -> str:
        return f"hashing {self.path}: {_bytes(self.done)} of {_bytes(self.total)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageFileChecked(Event):
    """One file's verdict: ok, missing, corrupt, wrong_size, unexpected or unsafe.

    ``bad_chunks`` lists the indices of chunks whose hash did not match; ``fast``
    is true when the stat record of an earlier full check vouched for the file.
    """

    kind: ClassVar[str] = "storage.file.checked"
    path: str
    status: str
    required: bool
    size: int | None
    expected_size: int | None
    bad_chunks: tuple[int, ...] = ()
    detail: str = ""
    fast: bool = False

    @property
    def message(self) -> str:
        text = f"{self.path}: {self.status}"
        if self.bad_chunks:
            shown = ", ".join(map(str, self.bad_chunks[:8]))
            more = "…" if len(self.bad_chunks) > 8 else ""
            text += f" (bad chunks {shown}{more})"
        if self.detail:
            text += f" ({self.detail})"
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageVerifyFinished(Event):
    """Verification ended; ``counts`` maps each status to its number of files."""

    kind: ClassVar[str] = "storage.verify.finished"
    ok: bool
    counts: dict[str, int]
    bytes_hashed: int
    seconds: float

    @property
    def message(self) -> str:
        summary = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items()) if n)
        verdict = "all required files good" if self.ok else "required files need repair"
        return f"verified in {self.seconds:.2f}s: {summary or 'no files'}; {verdict}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageLockWaiting(Event):
    """Another process is repairing this store; this one waits for it to finish."""

    kind: ClassVar[str] = "storage.lock.waiting"
    root: str
    lock_path: str

    @property
    def message(self) -> str:
        return (
            f"another Kensho process is repairing {self.root}; waiting for it "
            f"(lock {self.lock_path}; use --no-wait to fail instead)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageRepairStarted(Event):
    """A repair began: how many files, bytes to fetch, and free space."""

    kind: ClassVar[str] = "storage.repair.started"
    files: int
    bytes_needed: int
    bytes_free: int

    @property
    def message(self) -> str:
        return (
            f"repairing {self.files} files: up to {_bytes(self.bytes_needed)} to write, "
            f"{_bytes(self.bytes_free)} free"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageDownloadProgress(Event):
    """Bytes fetched for one file so far, counted per verified chunk."""

    kind: ClassVar[str] = "storage.download.progress"
    path: str
    source: str
    done: int
    total: int

    @property
    def message(self) -> str:
        done, total = _bytes(self.done), _bytes(self.total)
        return f"fetching {self.path} from {self.source}: {done} of {total}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageSourceFailed(Event):
    """A source could not deliver a file; ``next_source`` is tried next, if any."""

    kind: ClassVar[str] = "storage.source.failed"
    path: str
    source: str
    error: str
    next_source: str | None

    @property
    def message(self) -> str:
        then = f"; trying {self.next_source}" if self.next_source else ""
        return f"{self.source} could not deliver {self.path}: {self.error}{then}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageChunkRejected(Event):
    """A source delivered a chunk whose hash does not match; it was discarded."""

    kind: ClassVar[str] = "storage.chunk.rejected"
    path: str
    source: str
    chunk: int
    attempt: int

    @property
    def message(self) -> str:
        return (
            f"{self.source} sent wrong bytes for chunk {self.chunk} of {self.path} "
            f"(attempt {self.attempt}); discarded"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageFileRepaired(Event):
    """A file was made good: bytes fetched from sources and reused from disk."""

    kind: ClassVar[str] = "storage.file.repaired"
    path: str
    fetched: int
    reused: int
    sources: tuple[str, ...]

    @property
    def message(self) -> str:
        where = ", ".join(self.sources) or "local data"
        return (
            f"repaired {self.path}: fetched {_bytes(self.fetched)} from {where}, "
            f"reused {_bytes(self.reused)}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageRepairFailed(Event):
    """A file could not be made good; nothing was placed at its path."""

    kind: ClassVar[str] = "storage.repair.failed"
    path: str
    required: bool
    reason: str

    @property
    def message(self) -> str:
        what = "required" if self.required else "optional"
        return f"could not repair {what} file {self.path}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageReady(Event):
    """The store can be used: ``state`` is ``ok`` or ``degraded`` (optional files bad).

    ``offline`` is true when a repair was needed and no source could be reached, or
    when no source is configured.
    """

    kind: ClassVar[str] = "storage.ready"
    state: str
    offline: bool
    degraded: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        text = "store ready" if self.state == "ok" else "store ready in degraded mode"
        if self.degraded:
            text += f" (optional files unavailable: {', '.join(self.degraded)})"
        if self.offline:
            text += "; offline: no source reachable"
        return text


# --- storage update events (delta updates) -------------------------------------------

__all__ += [
    "StorageFileUpdated",
    "StorageUpdateFilePlanned",
    "StorageUpdateFinished",
    "StorageUpdatePlanned",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageUpdateFilePlanned(Event):
    """One file of an update plan, streamed before any byte is written.

    ``action`` is ``changed`` (a new version of a file the store has), ``added`` (not
    in the current manifest) or ``removed`` (left in place, reported as unexpected).
    ``bytes_reused`` come from chunks already on disk (any file), ``bytes_to_fetch``
    from the sources in ``requests`` byte-range requests (adjacent chunks merged).
    """

    kind: ClassVar[str] = "storage.update.file"
    path: str
    action: str
    version: str
    previous_version: str | None
    changelog: str
    size: int
    bytes_reused: int
    bytes_to_fetch: int
    requests: int

    @property
    def message(self) -> str:
        if self.action == "removed":
            return f"{self.path}: no longer in the manifest; left in place"
        was = f" (was {self.previous_version})" if self.previous_version else ""
        text = (
            f"{self.path}: {self.action} to {self.version}{was}: reuse "
            f"{_bytes(self.bytes_reused)}, fetch {_bytes(self.bytes_to_fetch)}"
        )
        return text + (f" — {self.changelog}" if self.changelog else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageUpdatePlanned(Event):
    """The whole update plan: totals over every file, and whether it is a dry run."""

    kind: ClassVar[str] = "storage.update.planned"
    from_serial: int
    to_serial: int
    version: str
    files: int
    unchanged: int
    removed: int
    bytes_reused: int
    bytes_to_fetch: int
    bytes_to_write: int
    dry_run: bool

    @property
    def message(self) -> str:
        how = " (dry run: nothing changed)" if self.dry_run else ""
        return (
            f"update serial {self.from_serial} -> {self.to_serial} ({self.version}): "
            f"{self.files} files to update, {self.unchanged} unchanged, {self.removed} removed; "
            f"reuse {_bytes(self.bytes_reused)}, fetch {_bytes(self.bytes_to_fetch)}{how}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageFileUpdated(Event):
    """A new version of a file was assembled, verified and swapped in."""

    kind: ClassVar[str] = "storage.file.updated"
    path: str
    version: str
    changelog: str
    fetched: int
    reused: int
    sources: tuple[str, ...]

    @property
    def message(self) -> str:
        where = ", ".join(self.sources) or "local data"
        return (
            f"updated {self.path} to {self.version}: fetched {_bytes(self.fetched)} from "
            f"{where}, reused {_bytes(self.reused)}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageUpdateFinished(Event):
    """An update ended; on success ``serial`` is the store's new trusted serial."""

    kind: ClassVar[str] = "storage.update.finished"
    serial: int
    files: int
    fetched: int
    reused: int
    seconds: float

    @property
    def message(self) -> str:
        return (
            f"store updated to serial {self.serial} in {self.seconds:.2f}s: {self.files} files, "
            f"fetched {_bytes(self.fetched)}, reused {_bytes(self.reused)}"
        )


# --- runtime events (breaker, runtime manager, executor) -----------------------------

# Extended per section, so that parallel edits of this file do not collide.
__all__ += [
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


# --- the status stream: snapshot and decoder ------------------------------------------
#
# ``GET /v1/kensho/status`` sends ``event: <kind>`` + ``data: <json>`` pairs: a
# ``snapshot`` first and then every second (queue depth, counters), the events above
# as they happen, and ``shutdown`` at the end. Every reader (``kensho status``, the
# tests; the dashboard reads the same field names) decodes them here, through the
# same dataclasses the server encodes with, so a renamed field is a decoding error
# that names the field instead of a view that silently shows ``None``.

__all__ += [
    "BreakerChange",
    "BreakerSnapshot",
    "IntegritySnapshot",
    "QueueSnapshot",
    "ServerShutdown",
    "StatusSnapshot",
    "TrafficSnapshot",
    "UnknownEvent",
    "decode_event",
    "event_types",
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
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerShutdown(Event):
    """The server is shutting down: the stream ends after this event."""

    kind: ClassVar[str] = "shutdown"

    @property
    def message(self) -> str:
        return "server shutting down"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownEvent(Event):
    """An event of a kind this version does not know (a newer server): shown as text."""

    kind: ClassVar[str] = "unknown"
    name: str
    text: str

    @property
    def message(self) -> str:
        return self.text


def event_types() -> dict[str, type[Event]]:
    """Every event class of this vocabulary by its ``kind``.

    Read from this module's names rather than ``__subclasses__()``: a slotted
    dataclass is a copy of the class it decorates, and the original lingers there.
    """
    return {
        obj.kind: obj
        for obj in globals().values()
        if isinstance(obj, type) and issubclass(obj, Event) and obj not in {Event, UnknownEvent}
    }


_ADAPTERS: dict[type[Event], Any] = {}


def decode_event(kind: str, data: Mapping[str, Any]) -> Event:
    """The event a status-stream ``event: kind`` / ``data: …`` pair encodes.

    Fields are validated against the event's dataclass (types included); a missing or
    mistyped field raises :class:`ValueError` naming the kind and the field. A kind
    this version does not know becomes an :class:`UnknownEvent` with its message.
    """
    from pydantic import TypeAdapter, ValidationError  # only readers of the stream need it

    cls = event_types().get(kind)
    if cls is None:
        return UnknownEvent(name=kind, text=str(data.get("message", "")))
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    try:
        event: Event = adapter.validate_python(dict(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "data"
        raise ValueError(f"status event {kind!r}: {where}: {first['msg']}") from None
    return event
