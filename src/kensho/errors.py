"""Kensho's one exception tree.

Every error Kensho raises on purpose derives from :class:`KenshoError`, so a caller
can catch everything Kensho-specific in one clause and still tell the families apart.
Exceptions of other libraries (``OSError``, ``httpx.HTTPError``, ``torch`` errors, ...)
are wrapped at the boundary where they occur and kept as ``__cause__``.

Messages say what happened, to which file or task, and what the user can do.

::

    KenshoError
    ├── ConfigError            bad settings file or KENSHO_* variable (names the key)
    ├── ManifestError          malformed or hostile manifest (names the field)
    ├── SignatureError         manifest signature, rollback or expiry check failed
    ├── IntegrityError         required files could not be made good (lists them)
    ├── DiskSpaceError         not enough free space for a repair or update
    ├── StoreBusyError         another process holds the store lock (``--no-wait``)
    ├── UnsafePathError        a store path leads through a symbolic link (outside the root)
    ├── SourceError            a source could not deliver (folder, HTTP server)
    │   ├── SourceUnreachableError   the source cannot be reached at all (offline)
    │   └── DownloadError      a download failed or delivered the wrong bytes
    ├── TransferTooSlowError   a transfer stayed below the minimum rate (internal to
    │                          the sources: turned into a DownloadError naming the source)
    ├── InvalidRequestError    a request an engine cannot serve as given (also a ValueError)
    ├── EngineError            an inference engine failed
    │   ├── EngineUnavailableError   the engine cannot run here (no CUDA, not loaded)
    │   └── EngineOutOfMemoryError   the device ran out of memory
    ├── CircuitOpenError       the circuit breaker refuses calls for now
    ├── QueueFullError         the executor rejected or shed a task (overload)
    └── TaskTimeoutError       a task missed its deadline
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CircuitOpenError",
    "ConfigError",
    "DiskSpaceError",
    "DownloadError",
    "EngineError",
    "EngineOutOfMemoryError",
    "EngineUnavailableError",
    "IntegrityError",
    "InvalidRequestError",
    "KenshoError",
    "ManifestError",
    "QueueFullError",
    "SignatureError",
    "SourceError",
    "SourceUnreachableError",
    "StoreBusyError",
    "TaskTimeoutError",
    "TransferTooSlowError",
    "UnsafePathError",
]


class KenshoError(Exception):
    """Root of every error Kensho raises on purpose."""


class ConfigError(KenshoError):
    """A settings file or ``KENSHO_*`` variable is invalid.

    ``key`` is the dotted name of the offending setting (``server.port``), or ``None``
    when the whole file is unreadable.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ManifestError(KenshoError):
    """A manifest is malformed or hostile; ``field`` names where (``files[3].path``)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class SignatureError(KenshoError):
    """A manifest failed a trust check: signature, threshold, rollback or expiry."""


class IntegrityError(KenshoError):
    """Required files are missing or corrupt and could not be repaired.

    ``problems`` maps each such file path to a one-line reason.
    """

    def __init__(self, message: str, *, problems: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.problems = dict(problems or {})


class DiskSpaceError(KenshoError):
    """Not enough free disk space: ``needed`` and ``free`` are in bytes."""

    def __init__(self, message: str, *, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


class StoreBusyError(KenshoError):
    """Another process holds the store lock and the caller asked not to wait."""

    def __init__(self, message: str, *, lock_path: Path) -> None:
        super().__init__(message)
        self.lock_path = lock_path


class SourceError(KenshoError):
    """A source (mirror folder, HTTP server) could not deliver what was asked."""


class SourceUnreachableError(SourceError):
    """The source cannot be reached at all (no network, server down, folder absent).

    Why its own class: when every source fails this way the store is offline, not
    broken, and the manager boots on what it has instead of failing.
    """


class UnsafePathError(KenshoError):
    """A path would lead outside the store root through a symbolic link."""


class TransferTooSlowError(KenshoError):
    """A transfer delivered less than the minimum rate over a whole window.

    Internal to the sources: it is turned into a :class:`DownloadError` naming the
    source before it leaves them.
    """

    def __init__(self, received: int, seconds: float, min_rate: float) -> None:
        super().__init__(
            f"sent {received} bytes in {seconds:.1f} s, below the minimum of {min_rate:g} bytes/s"
        )
        self.received = received
        self.seconds = seconds


class DownloadError(SourceError):
    """A download failed, was cut short, or delivered bytes that do not match."""


class InvalidRequestError(KenshoError, ValueError):
    """The request itself is wrong (prompt longer than the context, a chat the model's
    template refuses): the client must change it. It is a ``ValueError`` so breakers
    never count it against an engine, and the HTTP API answers 400. ``param`` names
    the request field at fault when there is one (the OpenAI error body carries it).
    """

    def __init__(
        self, message: str, *, code: str = "invalid_request", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class EngineError(KenshoError):
    """An inference engine failed; the circuit breaker counts these."""


class EngineUnavailableError(EngineError):
    """The engine cannot run on this machine right now (no device, not loaded).

    ``permanent`` says that retrying cannot help while this process lives (no CUDA
    device at all), so the runtime stops probing it instead of failing every minute.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class EngineOutOfMemoryError(EngineError):
    """The engine's device ran out of memory (cached memory was released first)."""


class CircuitOpenError(KenshoError):
    """The circuit breaker refuses calls; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(KenshoError):
    """The executor refused a task: ``reason`` is ``rejected``, ``shed`` or ``overloaded``."""

    def __init__(self, message: str, *, reason: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class TaskTimeoutError(KenshoError):
    """A task missed its deadline; ``phase`` is ``queue`` or ``total``."""

    def __init__(self, message: str, *, phase: str) -> None:
        super().__init__(message)
        self.phase = phase
