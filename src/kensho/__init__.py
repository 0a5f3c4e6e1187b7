"""Kensho: an offline-first runtime for local AI applications.

Three parts, each usable on its own:

- ``kensho.storage``: the integrity store (manifest, verify, repair, delta updates).
- ``kensho.runtime``: engines behind a circuit breaker, and a priority task executor.
- ``kensho.telemetry``: structured JSON logging through one service.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("kensho")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

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
