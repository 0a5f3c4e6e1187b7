"""LoggerService: the one place every Kensho log event passes through.

Design, in the order an event travels:

1. ``get_logger("storage")`` returns a structlog filtering logger bound to
   ``service="storage"``. Its class is chosen for the service's minimum level, so a
   call below it is a method that returns ``None`` at once (well under 0.2 µs).
2. The shared processor chain merges request context (contextvars), puts the header
   first (timestamp, level, service, event), redacts secrets and turns ``exc_info``
   into a structured ``error`` object.
3. The router renders the event once per format and writes it to every sink under one
   lock, counting events by level for metrics.
4. With OTLP export configured (``[telemetry]`` or ``OTEL_EXPORTER_OTLP_*``), the
   router also hands the finished dict to the export queue (``_otlp.py``): an append
   to a bounded deque, everything else happens on export threads.

Reconfiguring mutates the chain and the router in place and re-classes live loggers,
so loggers obtained before ``configure_logging`` follow the new settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import IO, Any, Literal

import structlog
from structlog.contextvars import merge_contextvars
from structlog.typing import FilteringBoundLogger

from kensho.config import LogSettings, TelemetrySettings
from kensho.errors import ConfigError
from kensho.telemetry._processors import add_header, format_exc_info, redact_secrets
from kensho.telemetry._sinks import (
    RotatingFileSink,
    Sink,
    StreamSink,
    render_console,
    render_json,
)

__all__ = ["LEVELS", "LoggerService"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _Router:
    """The structlog "logger" at the end of the chain: renders and writes to sinks.

    Rendering happens outside the lock; only the writes (and the counters) are
    serialised, which is what keeps lines whole across threads.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.json_sinks: list[Sink] = []
        self.console_sinks: list[Sink] = []
        self.capture: list[dict[str, Any]] | None = None
        self.counts: dict[str, int] = dict.fromkeys(LEVELS, 0)
        self.dropped = 0  # lines a sink could not take (closed pipe, full disk)
        self.colors = True
        self.exports: list[Any] = []  # OtlpExport queues, fed the finished dicts

    @property
    def sinks(self) -> list[Sink]:
        return self.json_sinks + self.console_sinks

    def set_sinks(self, sinks: list[Sink]) -> list[Sink]:
        """Swap in new sinks (caller holds the lock); returns the old ones."""
        old = self.sinks
        self.json_sinks = [s for s in sinks if s.format == "json"]
        self.console_sinks = [s for s in sinks if s.format != "json"]
        return old

    def emit(self, event_dict: dict[str, Any]) -> None:
        if self.capture is not None:
            with self.lock:
                self._count(event_dict)
                if self.capture is not None:
                    self.capture.append(event_dict)
                    return
        line = render_json(event_dict) if self.json_sinks else b""
        text = render_console(event_dict, colors=self.colors) if self.console_sinks else b""
        with self.lock:
            self._count(event_dict)
            for sink in self.json_sinks:
                self._write(sink, line)
            for sink in self.console_sinks:
                self._write(sink, text)
        for export in self.exports:
            export.put(event_dict)

    def _write(self, sink: Sink, data: bytes) -> None:
        """A sink that fails (closed pipe, full disk) loses the line, never the caller.

        Logging must not turn a repair near a full disk into an ``OSError`` in the
        code that happened to log; the loss is counted and said once on the real
        stderr.
        """
        try:
            sink.write(data)
        except (OSError, ValueError) as exc:  # ValueError: write to a closed stream
            self.dropped += 1
            if self.dropped == 1 and sys.__stderr__ is not None:
                with contextlib.suppress(Exception):
                    sys.__stderr__.write(f"kensho: a log sink failed ({exc}); lines are lost\n")

    def _count(self, event_dict: dict[str, Any]) -> None:
        level = event_dict.get("level", "info")
        self.counts[level] = self.counts.get(level, 0) + 1

    # structlog calls the method named after the level with the final processor's output.
    def _call(self, event_dict: dict[str, Any]) -> None:
        self.emit(event_dict)

    debug = info = warning = warn = error = exception = critical = fatal = msg = _call


def _dispatch(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (event_dict,), {}


class _StdlibBridge(logging.Handler):
    """Routes stdlib ``logging`` records (httpx, uvicorn, asyncio) through the chain."""

    def __init__(self, service: LoggerService) -> None:
        super().__init__(logging.NOTSET)
        self._service = service

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: dict[str, Any] = {"service": record.name, "event": record.getMessage()}
            if record.exc_info and record.exc_info[1] is not None:
                event["exc_info"] = record.exc_info[1]
            method = record.levelname.lower()
            self._service.process(method if method in LEVELS else "info", event)
        except Exception:  # a log handler must never raise into the caller
            self.handleError(record)


def _wants_colour(stream: object) -> bool:
    """ANSI colours only for a terminal, and never when ``NO_COLOR`` is set."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) and "NO_COLOR" not in os.environ


class OpenSpan:
    """A span held open across awaits and tasks, ended explicitly.

    Why not a ``with`` block: a queue wait starts in the request's task and ends in
    the executor's, and an engine attempt lives inside an async generator; neither
    may make itself the *current* span (that would leak into whatever the task
    runs next). Ending twice is harmless; without export it is a shared no-op.
    """

    __slots__ = ("_span",)

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def end(self, error: BaseException | None = None, /, **attributes: Any) -> None:
        """End the span now, with ``attributes`` and, if given, ``error`` recorded."""
        span, self._span = self._span, None
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


_NO_SPAN = OpenSpan()
_CHATTY = ("httpx", "httpcore")  # libraries whose INFO is a line per request


class LoggerService:
    """Centralised structured logging (the roadmap's LoggerService).

    Use the module functions :func:`kensho.telemetry.configure_logging` and
    :func:`kensho.telemetry.get_logger`; create a service directly only to isolate
    logging in tests or embedded uses.
    """

    def __init__(self) -> None:
        self._router = _Router()
        self._processors: list[Any] = [
            merge_contextvars,
            add_header,
            redact_secrets,
            format_exc_info,
            _dispatch,
        ]
        self._loggers: dict[str, Any] = {}
        self._level = "info"
        self._levels: dict[str, str] = {}
        self._bridge: _StdlibBridge | None = None
        self.settings = LogSettings()
        self._configured = False
        self._export: Any = None  # the OtlpExport, when telemetry export is configured
        self._trace_ids: Any = None  # its trace-id processor, in the chain while it runs

    # -- configuration -------------------------------------------------------------

    def configure(
        self,
        settings: LogSettings | None = None,
        *,
        stream: IO[str] | None = None,
        stderr: bool = True,
        capture_stdlib: bool = True,
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        """(Re)configure levels and sinks from ``settings`` (defaults: info, JSON/console).

        ``telemetry`` with an endpoint turns OTLP export on; ``None`` or no endpoint
        turns it off (what was queued is flushed first).
        """
        settings = settings or LogSettings()
        self._configure_export(telemetry)
        sinks: list[Sink] = []
        if stderr:
            fmt: Literal["json", "console"]
            if settings.format == "auto":
                target = stream if stream is not None else sys.stderr
                isatty = getattr(target, "isatty", None)
                fmt = "console" if isatty is not None and isatty() else "json"
            else:
                fmt = settings.format
            sinks.append(StreamSink(stream, format=fmt))
        if settings.file is not None:
            sinks.append(
                RotatingFileSink(
                    settings.file,
                    max_bytes=settings.file_max_bytes,
                    backups=settings.file_backups,
                )
            )
        with self._router.lock:
            old = self._router.set_sinks(sinks)
        for sink in old:
            if isinstance(sink, RotatingFileSink):
                sink.close()
        target = stream if stream is not None else sys.stderr
        self._router.colors = _wants_colour(target)
        self.settings = settings
        self._configured = True
        if capture_stdlib:
            self._install_bridge()
        self._apply_levels(settings.level, dict(settings.levels))

    def _configure_export(self, telemetry: TelemetrySettings | None) -> None:
        wanted = telemetry if telemetry is not None and telemetry.enabled else None
        current = self._export.settings if self._export is not None else None
        if wanted == current:
            return
        if self._export is not None:
            self._router.exports = []
            self._processors.remove(self._trace_ids)
            self._export.close()
            self._export = None
        if wanted is None:
            return
        try:
            from kensho.telemetry import _otlp, _tracing
        except ImportError as exc:
            raise ConfigError(
                f"telemetry export is configured but OpenTelemetry is missing ({exc.name}): "
                "install it with pip install 'kensho[otel]'",
                key="telemetry.endpoint",
            ) from None
        self._export = _otlp.OtlpExport(wanted)
        self._trace_ids = _tracing.add_trace_ids
        self._processors.insert(1, self._trace_ids)
        self._router.exports = [self._export]

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        """A trace span while export is on (see :func:`kensho.telemetry.span`)."""
        if self._export is None:
            yield
            return
        with self._export.tracer.start_as_current_span(name, attributes=attributes):
            yield

    def start_span(self, name: str, **attributes: Any) -> OpenSpan:
        """A span that starts now, as a child of the current one, and ends when its
        owner says so (see :func:`kensho.telemetry.start_span`)."""
        if self._export is None:
            return _NO_SPAN
        return OpenSpan(self._export.tracer.start_span(name, attributes=attributes))

    @property
    def export(self) -> Any:
        """The running OTLP export (``stats()``, ``flush()``, ``tracer``), or ``None``."""
        return self._export

    def _ensure_configured(self) -> None:
        # Implicit defaults only: merely importing Kensho must not take over the
        # process's stdlib logging (root handlers and level) from the application.
        if not self._configured:
            self.configure(capture_stdlib=False)

    def level_for(self, service: str) -> str:
        """The minimum level of ``service``: the longest dotted-prefix override wins."""
        name = service
        while True:
            if name in self._levels:
                return self._levels[name]
            if "." not in name:
                return self._level
            name = name.rsplit(".", 1)[0]

    def _apply_levels(self, level: str, levels: Mapping[str, str]) -> None:
        self._level, self._levels = level, dict(levels)
        for name, logger in list(self._loggers.items()):
            logger.__class__ = structlog.make_filtering_bound_logger(LEVELS[self.level_for(name)])
        if self._bridge is None:
            return  # stdlib logging is the application's until configure_logging() says
        logging.getLogger().setLevel(LEVELS[level])
        for name in _CHATTY:
            # One INFO line per HTTP request (a sync makes one per chunk): kept for
            # [log] levels that name them, or a debug run.
            if name not in self._levels:
                logging.getLogger(name).setLevel(
                    LEVELS[level] if level == "debug" else logging.WARNING
                )
        for name, value in self._levels.items():
            logging.getLogger(name).setLevel(LEVELS[value])

    def _install_bridge(self) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, _StdlibBridge):
                root.removeHandler(handler)
        self._bridge = _StdlibBridge(self)
        root.addHandler(self._bridge)

    # -- use -----------------------------------------------------------------------

    def get_logger(self, service: str) -> FilteringBoundLogger:
        """A logger whose events carry ``service``; cached per name."""
        self._ensure_configured()
        logger = self._loggers.get(service)
        if logger is None:
            cls: Any = structlog.make_filtering_bound_logger(LEVELS[self.level_for(service)])
            logger = cls(self._router, self._processors, {"service": service})
            self._loggers[service] = logger
        return logger  # type: ignore[no-any-return]

    def process(self, method: str, event_dict: dict[str, Any]) -> None:
        """Run one event through the chain (used by the stdlib bridge)."""
        result: Any = event_dict
        for processor in self._processors[:-1]:
            result = processor(None, method, result)
        self._router.emit(result)

    def flush_export(self) -> None:
        """Push every queued record and span out to the collector (or the spool), now.

        Each request is bounded by ``telemetry.timeout``; a collector that is away
        costs one attempt, then the batches go to the spool.
        """
        if self._export is not None:
            self._export.flush()

    def export_stats(self) -> dict[str, dict[str, int]] | None:
        """The export's counters per signal (see ``OtlpExport.stats``); ``None`` when off.

        Read at scrape time by ``/metrics``, whichever export is running then.
        """
        export = self._export
        return export.stats() if export is not None else None

    @property
    def dropped(self) -> int:
        """Lines lost because a sink failed (closed pipe, full disk)."""
        return self._router.dropped

    def counts(self) -> dict[str, int]:
        """Events emitted so far, by level (for the ``/metrics`` endpoint)."""
        with self._router.lock:
            return dict(self._router.counts)

    def flush(self) -> None:
        """Flush every sink; call at shutdown."""
        with self._router.lock:
            for sink in self._router.sinks:
                if isinstance(sink, StreamSink):
                    sink.close()

    def close(self) -> None:
        """Close file sinks and detach from stdlib logging."""
        self._configure_export(None)
        with self._router.lock:
            sinks = self._router.set_sinks([])
        for sink in sinks:
            sink.close()
        if self._bridge is not None:
            logging.getLogger().removeHandler(self._bridge)
            self._bridge = None

    @contextmanager
    def capture(self, min_level: str | None = "debug") -> Iterator[list[dict[str, Any]]]:
        """Collect processed event dicts instead of writing them (see ``testing``)."""
        self._ensure_configured()
        saved = (self._level, dict(self._levels))
        captured: list[dict[str, Any]] = []
        with self._router.lock:
            previous, self._router.capture = self._router.capture, captured
        if min_level is not None:
            self._apply_levels(min_level, {})
        try:
            yield captured
        finally:
            with self._router.lock:
                self._router.capture = previous
            if min_level is not None:
                self._apply_levels(*saved)
