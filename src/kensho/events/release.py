"""Events of over-the-air releases: channel checks, background prefetch, apply.

A device polls its sources' release channels (:mod:`kensho.storage.channel`), stages
a newer trusted release in the background (:mod:`kensho.storage.prefetch`) and
applies it at the next boot, on demand, or live. Each step says what happened here,
so an operator reads on the status stream, in the logs and in ``kensho status``
why a device is (or is not) on the release that was published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kensho.events._base import Event

__all__ = [
    "ReleaseApplied",
    "ReleaseApplyFailed",
    "ReleaseChecked",
    "ReleasePrefetchProgress",
    "ReleasePrefetchStopped",
    "ReleaseRefused",
    "ReleaseSnapshot",
    "ReleaseStaged",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseChecked(Event):
    """One poll of the release channels ended.

    ``result``: ``new`` (a newer trusted release, ``serial``), ``current`` (the store
    runs it or has it staged), ``unchanged`` (304 / same file), ``refused`` (see
    :class:`ReleaseRefused`), ``none`` (no source publishes a release) or
    ``unreachable``. Logged only when something is new (a poll a minute must not
    flood the log); always on the status stream.
    """

    kind: ClassVar[str] = "release.checked"
    result: str
    source: str | None
    serial: int | None
    current_serial: int | None
    detail: str = ""

    @property
    def message(self) -> str:
        where = f" on {self.source}" if self.source else ""
        if self.result == "new":
            return f"release {self.serial} found{where} (running {self.current_serial})"
        extra = f": {self.detail}" if self.detail else ""
        return f"release check{where}: {self.result}{extra}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseRefused(Event):
    """A published release failed a trust rule; it is never staged nor applied.

    Emitted once per distinct refused manifest (a channel that keeps serving it
    is not reported at every poll).
    """

    kind: ClassVar[str] = "release.refused"
    log_level: ClassVar[str | None] = "warning"
    source: str
    serial: int | None
    reason: str

    @property
    def message(self) -> str:
        serial = f" {self.serial}" if self.serial is not None else ""
        return f"release{serial} from {self.source} refused: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleasePrefetchProgress(Event):
    """Bytes of a release staged so far (fetched or copied from local files)."""

    kind: ClassVar[str] = "release.prefetch.progress"
    serial: int
    done: int
    total: int

    @property
    def message(self) -> str:
        return f"staging release {self.serial}: {self.done}/{self.total} bytes"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseStaged(Event):
    """Every file of a release is staged and verified: it can be applied offline."""

    kind: ClassVar[str] = "release.staged"
    log_level: ClassVar[str | None] = "info"
    serial: int
    version: str
    files: int
    fetched: int
    reused: int

    @property
    def message(self) -> str:
        return (
            f"release {self.serial} ({self.version}) staged: {self.files} file(s), "
            f"{self.fetched} bytes fetched, {self.reused} reused"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleasePrefetchStopped(Event):
    """Staging stopped before the end; what verified is kept and resumed later.

    ``reason`` says why: ``disk_full`` (the margin kept for the running release was
    reached), ``source`` (the sources could not deliver) or ``refused``.
    """

    kind: ClassVar[str] = "release.prefetch.stopped"
    log_level: ClassVar[str | None] = "warning"
    serial: int
    reason: str
    detail: str

    @property
    def message(self) -> str:
        return f"staging of release {self.serial} stopped ({self.reason}): {self.detail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseApplied(Event):
    """The store switched to a staged release (``how``: ``boot``, ``request``, ``live``)."""

    kind: ClassVar[str] = "release.applied"
    log_level: ClassVar[str | None] = "info"
    serial: int
    previous_serial: int | None
    how: str

    @property
    def message(self) -> str:
        return f"release {self.serial} applied ({self.how}), was {self.previous_serial}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseApplyFailed(Event):
    """Applying a staged release failed; the store stays on (or went back to)
    ``serial``."""

    kind: ClassVar[str] = "release.apply.failed"
    log_level: ClassVar[str | None] = "error"
    target_serial: int
    serial: int | None
    reason: str

    @property
    def message(self) -> str:
        return (
            f"release {self.target_serial} not applied, the store stays on "
            f"{self.serial}: {self.reason}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseSnapshot:
    """Where a device stands with releases, for the status snapshot and ``kensho status``.

    ``current_serial``: the release served. ``staged_*``: the release being staged
    (bytes fetched of those to fetch; ``staged_complete`` once it can be applied
    offline). ``last_check_*``: the last poll of the channels (see
    :class:`ReleaseChecked`). ``auto_apply``: a staged release is applied live.
    """

    current_serial: int | None
    staged_serial: int | None = None
    staged_done: int = 0
    staged_total: int = 0
    staged_complete: bool = False
    last_check_at: float | None = None
    last_check_result: str | None = None
    last_check_detail: str = ""
    auto_apply: bool = False
