"""Structured telemetry: one logging service, JSON lines, levels, services, context.

::

    from kensho.telemetry import configure_logging, get_logger, bound_context

    configure_logging(level="info", levels={"storage": "debug"})
    log = get_logger("storage")
    with bound_context(request_id="r-42"):
        log.info("file verified", path="models/x.safetensors", bytes=7340032)

The event schema is documented in ``docs/logging.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

from structlog.contextvars import bind_contextvars as bind_context
from structlog.contextvars import bound_contextvars as bound_context
from structlog.contextvars import clear_contextvars as clear_context
from structlog.contextvars import unbind_contextvars as unbind_context
from structlog.typing import FilteringBoundLogger

from kensho.config import LogSettings, TelemetrySettings, load_settings
from kensho.telemetry._processors import REDACTED, error_to_dict, is_secret_key
from kensho.telemetry._service import LEVELS, LoggerService, OpenSpan

__all__ = [
    "LEVELS",
    "REDACTED",
    "FilteringBoundLogger",
    "LoggerService",
    "OpenSpan",
    "bind_context",
    "bound_context",
    "clear_context",
    "configure_logging",
    "error_to_dict",
    "get_logger",
    "is_secret_key",
    "log_service",
    "span",
    "start_span",
    "traced",
    "unbind_context",
]

_service = LoggerService()


def log_service() -> LoggerService:
    """The process-wide :class:`LoggerService` behind the module functions."""
    return _service


def configure_logging(
    settings: LogSettings | None = None,
    *,
    telemetry: TelemetrySettings | None = None,
    stream: IO[str] | None = None,
    stderr: bool = True,
    capture_stdlib: bool = True,
    **fields: Any,
) -> LoggerService:
    """Configure the process-wide logging service.

    Without ``settings``, the ``[log]`` settings come from the same sources as the
    ``kensho`` command: ``$KENSHO_CONFIG`` or ``./kensho.toml``, then ``KENSHO_LOG_*``
    variables (``KENSHO_LOG_LEVELS=storage=debug``), so a library user tunes levels the
    way a CLI user does; like the CLI, invalid settings raise
    :class:`~kensho.errors.ConfigError`. Passing ``settings`` uses exactly those.

    ``fields`` override either by name and are validated like the config file
    (``level="debug"``, ``levels={"storage": "debug"}``, ``format="json"``,
    ``file=Path("kensho.log")``, ``file_max_bytes``, ``file_backups``). ``stream``
    replaces stderr as the stream sink; ``stderr=False`` writes to the file only.

    ``telemetry`` configures OTLP export (see docs/logging.md, "Export"). Without
    ``settings``, it too comes from the CLI's sources (``[telemetry]``,
    ``KENSHO_TELEMETRY_*``, ``OTEL_EXPORTER_OTLP_*``...), so a library user exports
    as soon as a collector endpoint is set.
    """
    if settings is None:
        loaded = load_settings()
        base = loaded.log
        telemetry = telemetry if telemetry is not None else loaded.telemetry
    else:
        base = settings
    if fields:
        if isinstance(fields.get("file"), str):
            fields["file"] = Path(fields["file"])
        base = LogSettings.model_validate({**base.model_dump(), **fields})
    _service.configure(
        base, stream=stream, stderr=stderr, capture_stdlib=capture_stdlib, telemetry=telemetry
    )
    return _service


def span(name: str, **attributes: Any) -> AbstractContextManager[None]:
    """A trace span around a block (boot, verify, a request); a no-op without export.

    Log records emitted inside carry its ``trace_id`` and ``span_id``; an exception
    leaving the block is recorded on the span and re-raised.
    """
    return _service.span(name, **attributes)


def start_span(name: str, **attributes: Any) -> OpenSpan:
    """Start a span now, child of the current one, that its owner ends with
    :meth:`OpenSpan.end` (a queue wait, an engine attempt); a no-op without export.

    Unlike :func:`span` it does not become the current span, so it can start in one
    task and end in another.
    """
    return _service.start_span(name, **attributes)


def get_logger(service: str) -> FilteringBoundLogger:
    """The logger for ``service`` (``storage``, ``runtime.breaker``, ``server`` ...)."""
    return _service.get_logger(service)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def traced(name: str) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
    """Decorate a coroutine function so that each call runs inside :func:`span` ``name``."""

    def decorate(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
        @functools.wraps(fn)
        async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with span(name):
                return await fn(*args, **kwargs)

        return wrapper

    return decorate
