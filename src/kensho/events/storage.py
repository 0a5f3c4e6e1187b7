"""Events of the integrity store: verify, repair and delta update.

The facts worth a log line (a file repaired or updated, a repair that failed, a
source that failed or sent wrong bytes, the plan of an update, the store ready)
declare a ``log_level`` and a fixed ``log_name``: the hub's log listener writes
them under the ``storage`` service, so the store never logs them by hand beside
emitting them. Progress (hashing, downloads) and the verdicts the CLI prints itself
(verify finished, repair started) are not logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kensho.events._base import Event

# --- storage events (integrity store) ----------------------------------------------

__all__ = [
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
    log_level: ClassVar[str | None] = "warning"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "source failed"
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
    log_level: ClassVar[str | None] = "warning"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "chunk rejected"
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
    log_level: ClassVar[str | None] = "info"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "file repaired"
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
    log_level: ClassVar[str | None] = "warning"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "repair failed"
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
    log_level: ClassVar[str | None] = "info"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "store ready"
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
    log_level: ClassVar[str | None] = "info"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "update planned"
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
    log_level: ClassVar[str | None] = "info"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "update plan"
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
    """A new version of a file was assembled, verified and swapped in.

    ``previous_version``: the version it replaced (``None``: an added file);
    ``swap_seconds``: how long its swap took (rename and folder fsync).
    """

    kind: ClassVar[str] = "storage.file.updated"
    log_level: ClassVar[str | None] = "info"
    log_service: ClassVar[str] = "storage"
    log_name: ClassVar[str | None] = "file updated"
    path: str
    version: str
    changelog: str
    fetched: int
    reused: int
    sources: tuple[str, ...]
    previous_version: str | None = None
    swap_seconds: float = 0.0

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
