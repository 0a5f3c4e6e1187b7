"""Kensho: an offline-first runtime for local AI applications.

Three parts, each usable on its own:

- ``kensho.storage``: the integrity store (manifest, verify, repair, delta updates).
- ``kensho.runtime``: engines behind a circuit breaker, and a priority task executor.
- ``kensho.telemetry``: structured JSON logging through one service.

The names below are loaded on first use (PEP 562 ``__getattr__``): ``import kensho``
and every ``kensho`` command start without pydantic, structlog or
``importlib.metadata`` until a name that needs them is asked for. ``from kensho import
X`` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kensho._lazy import lazy_exports

if TYPE_CHECKING:
    from kensho.config import Settings, load_settings
    from kensho.errors import (
        CircuitOpenError,
        ConfigError,
        DiskSpaceError,
        DownloadError,
        EngineCrashedError,
        EngineError,
        EngineOutOfMemoryError,
        EngineUnavailableError,
        IntegrityError,
        InvalidRequestError,
        KenshoError,
        ManifestError,
        ModelFileError,
        QueueFullError,
        SignatureError,
        SourceError,
        SourceUnreachableError,
        StoreBusyError,
        TaskTimeoutError,
        TransferTooSlowError,
        UnsafePathError,
    )
    from kensho.telemetry import configure_logging, get_logger

    __version__: str

__all__ = [
    "CircuitOpenError",
    "ConfigError",
    "DiskSpaceError",
    "DownloadError",
    "EngineCrashedError",
    "EngineError",
    "EngineOutOfMemoryError",
    "EngineUnavailableError",
    "IntegrityError",
    "InvalidRequestError",
    "KenshoError",
    "ManifestError",
    "ModelFileError",
    "QueueFullError",
    "Settings",
    "SignatureError",
    "SourceError",
    "SourceUnreachableError",
    "StoreBusyError",
    "TaskTimeoutError",
    "TransferTooSlowError",
    "UnsafePathError",
    "__version__",
    "configure_logging",
    "get_logger",
    "load_settings",
]

# Which module defines each public name; __version__ is read from the package metadata.
_EXPORTS: dict[str, str] = {
    "Settings": "kensho.config",
    "load_settings": "kensho.config",
    "configure_logging": "kensho.telemetry",
    "get_logger": "kensho.telemetry",
    **{name: "kensho.errors" for name in __all__ if name.endswith("Error")},
}


def _package_version() -> str:
    """The installed distribution's version (``importlib.metadata`` costs ~0.1 s to load)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kensho")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


if not TYPE_CHECKING:  # mypy reads the imports above: a misspelt name stays an error
    __getattr__, __dir__ = lazy_exports(
        __name__, globals(), _EXPORTS, __all__, computed={"__version__": _package_version}
    )
