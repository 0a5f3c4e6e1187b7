"""OTLP/HTTP export of Kensho's log records (and spans), with the disk spool behind it.

The path of one log event, and who pays for each step:

1. the caller: :meth:`OtlpExport.put` appends the finished event dict to a bounded
   deque (about 0.3 µs; a full queue drops the event with a counter, never blocks);
2. the batch thread wakes every second (or at 512 queued), turns queued events into
   the SDK's ``ReadableLogRecord`` with Kensho's schema, and calls
   :class:`_LogExporter` (the SDK's ``LogRecordExporter`` interface), which
   serializes the batch with the SDK's OTLP protobuf encoder. Building and encoding
   cost tens of µs per record, which is why none of it runs on the caller's thread.
   The deque is the one bounded queue: the SDK's ``BatchLogRecordProcessor`` would
   be a second one, dropping records without our counter while the collector is
   slow, and its ``Logger.emit`` alone costs about 20 µs a record;
3. the shipper posts the bytes, or puts them in the :class:`~._spool.Spool` when the
   collector is unreachable, times out, or answers 429/5xx; its drain thread sends
   spooled batches, oldest first, once the collector answers again.

Spans are few (one per request, boot, verify) and take the SDK's standard path:
``TracerProvider`` and ``BatchSpanProcessor``, then the same shipper.

The SDK exporter's in-line retries (up to its whole timeout, on the batch thread) are
replaced by the spool, which is a retry that survives a restart: one attempt per
batch, then disk. A 4xx other than 429 means the collector will never take that
batch: it is dropped and counted, not retried forever.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from kensho.config import TelemetrySettings
from kensho.telemetry._spool import Outcome, Spool

__all__ = ["OtlpExport", "build_resource", "to_log_record"]

_SEVERITY = {
    "debug": SeverityNumber.DEBUG,
    "info": SeverityNumber.INFO,
    "warning": SeverityNumber.WARN,
    "error": SeverityNumber.ERROR,
    "critical": SeverityNumber.FATAL,
}
_HEADER_KEYS = frozenset({"timestamp", "level", "event", "error", "trace_id", "span_id"})
_MAX_ATTRIBUTES = 128  # the SDK's default limit: more would warn from a worker thread
_INT64 = (-(2**63), 2**63 - 1)
_CONTENT_TYPE = "application/x-protobuf"
_BATCH_SIZE = 512  # records per OTLP request (the SDK batch processors' default)
_BATCH_DELAY = 1.0  # seconds a record may wait for its batch (the SDK's default)


def build_resource(settings: TelemetrySettings) -> Resource:
    """``service.name``, ``service.version`` and ``host.name``, plus the configured ones."""
    from kensho import __version__

    attributes: dict[str, str] = {
        "service.name": settings.service_name,
        "service.version": __version__,
        "host.name": socket.gethostname(),
        **settings.resource_attributes,
    }
    return Resource.create(attributes)


def _attribute(value: Any, depth: int = 0) -> Any:
    """A context value as an OTLP ``AnyValue``: scalars as is, containers nested."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, Mapping) and depth < 4:
        return {str(k): _attribute(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple) and depth < 4:
        return [_attribute(v, depth + 1) for v in value]
    return orjson.dumps(value, default=repr).decode() if depth >= 4 else str(value)


def _stacktrace(error: Mapping[str, Any]) -> str:
    """Kensho's structured ``error`` as the Python traceback text OTel expects."""
    chunks: list[str] = []
    current: Mapping[str, Any] | None = error
    while current is not None:
        lines = ["Traceback (most recent call last):"]
        for frame in current.get("stack", []):
            where = f'File "{frame.get("file")}", line {frame.get("line")}'
            lines.append(f"  {where}, in {frame.get('function')}")
            if frame.get("code"):
                lines.append(f"    {frame['code']}")
        lines.append(f"{current.get('type')}: {current.get('message')}")
        chunks.insert(0, "\n".join(lines))
        cause = current.get("cause")
        current = cause if isinstance(cause, Mapping) else None
    return "\n\nThe above exception was the direct cause of the following exception:\n\n".join(
        chunks
    )


def _span_context(event: Mapping[str, Any]) -> Any:
    trace_id, span_id = event.get("trace_id"), event.get("span_id")
    if not isinstance(trace_id, str) or not isinstance(span_id, str):
        return None
    try:
        context = SpanContext(
            int(trace_id, 16), int(span_id, 16), is_remote=False, trace_flags=TraceFlags(1)
        )
    except ValueError:
        return None
    return trace.set_span_in_context(NonRecordingSpan(context))


def to_log_record(time_ns: int, event: Mapping[str, Any]) -> LogRecord:
    """One Kensho event dict as an OpenTelemetry log record (Kensho's schema kept).

    Body is the event sentence; attributes are the context fields (``service``
    included); an ``error`` becomes ``exception.type/message/stacktrace``; the trace
    and span ids, when the event was logged inside a span, become the record's own.
    """
    level = str(event.get("level", "info"))
    attributes: dict[str, Any] = {}
    for key, value in event.items():
        if key not in _HEADER_KEYS and len(attributes) < _MAX_ATTRIBUTES - 3:
            attributes[key] = _attribute(value)
    error = event.get("error")
    if isinstance(error, Mapping):
        attributes["exception.type"] = str(error.get("type", ""))
        attributes["exception.message"] = str(error.get("message", ""))
        attributes["exception.stacktrace"] = _stacktrace(error)
    return LogRecord(
        timestamp=time_ns,
        observed_timestamp=time_ns,
        context=_span_context(event),
        severity_text=level,
        severity_number=_SEVERITY.get(level, SeverityNumber.INFO),
        body=str(event.get("event", "")),
        attributes=attributes,
    )


class _Sender:
    """One POST of a serialized OTLP request; no retries (the spool is the retry)."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.urls = {s: settings.signal_url(s) for s in ("logs", "traces")}
        self.headers = {**settings.headers, "Content-Type": _CONTENT_TYPE}
        self.timeout = settings.timeout
        self.last_status: int | None = None

    def send(self, signal: str, payload: bytes) -> Outcome:
        url = self.urls.get(signal)
        if url is None:
            return Outcome.REJECTED
        request = urllib.request.Request(url, data=payload, headers=self.headers, method="POST")  # noqa: S310 - scheme checked in config
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                response.read()
                self.last_status = response.status
        except urllib.error.HTTPError as exc:
            self.last_status = exc.code
            exc.close()
            return Outcome.RETRY if exc.code == 429 or exc.code >= 500 else Outcome.REJECTED
        except (OSError, ValueError):  # refused, unreachable, timed out, bad TLS
            self.last_status = None
            return Outcome.RETRY
        return Outcome.SENT if 200 <= self.last_status < 300 else Outcome.REJECTED


class _Shipper:
    """Sends a batch now, or spools it; drains the spool when the collector is back.

    While the spool holds anything, new batches join it, so batches reach the
    collector in the order they were made. After a failed attempt the network is not
    tried again for ``retry_interval`` seconds: an offline device pays one timeout,
    not one per batch.
    """

    def __init__(self, settings: TelemetrySettings) -> None:
        self.sender = _Sender(settings)
        self.spool = Spool(settings.spool_path(), settings.spool_max_bytes)
        self.retry_interval = settings.retry_interval
        self.sent = 0  # records sent directly
        self.rejected = 0  # records refused by the collector (4xx)
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._drain_loop, name="kensho-otlp-spool", daemon=True
        )
        self._thread.start()

    def submit(self, signal: str, payload: bytes, records: int) -> None:
        if time.monotonic() >= self._retry_at and not self.spool.pending():
            outcome = self.sender.send(signal, payload)
            if outcome is Outcome.SENT:
                self.sent += records
                return
            if outcome is Outcome.REJECTED:
                self.rejected += records
                return
            self._retry_at = time.monotonic() + self.retry_interval
        if self.spool.max_bytes > 0:
            self.spool.put(signal, payload, records)
        else:
            self.spool.stats.failed += records
        self._wake.set()

    def _drain_loop(self) -> None:
        # At start too: what an earlier process spooled goes out first.
        while not self._stop.is_set():
            self.drain_once()
            self._wake.wait(self.retry_interval)
            self._wake.clear()

    def drain_once(self, deadline: float | None = None) -> None:
        if time.monotonic() < self._retry_at or not self.spool.pending():
            return
        with contextlib.suppress(Exception):  # never let the thread die on a surprise
            if not self.spool.drain(self.sender.send, deadline):
                self._retry_at = time.monotonic() + self.retry_interval
                return
            self._retry_at = 0.0

    def close(self, budget: float) -> None:
        """Stop the drain thread; one last drain while the collector answers."""
        self._stop.set()
        self._wake.set()
        self._thread.join(budget)
        self.drain_once(deadline=time.monotonic() + budget)


class _LogExporter(LogRecordExporter):
    """The SDK-facing exporter: encodes with the SDK, ships through the spool."""

    def __init__(self, shipper: _Shipper) -> None:
        self._shipper = shipper

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        payload = encode_logs(batch).SerializeToString()
        self._shipper.submit("logs", payload, len(batch))
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class _SpanExporter(SpanExporter):
    def __init__(self, shipper: _Shipper) -> None:
        self._shipper = shipper

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        payload = encode_spans(spans).SerializeToString()
        self._shipper.submit("traces", payload, len(spans))
        return SpanExportResult.SUCCESS


class OtlpExport:
    """Everything one configured export owns: queue, threads, SDK pieces, spool."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.resource = build_resource(settings)
        self.shipper = _Shipper(settings)
        self._exporter = _LogExporter(self.shipper)
        self._scope = InstrumentationScope("kensho")
        self.tracer_provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
        if settings.signal_url("traces") is not None:
            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(_SpanExporter(self.shipper), schedule_delay_millis=1000)
            )
        self.tracer = self.tracer_provider.get_tracer("kensho")
        self._queue: collections.deque[tuple[int, Mapping[str, Any]]] = collections.deque()
        self._max = settings.queue_size
        self.dropped = 0  # events lost because the queue was full
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._batching = threading.Lock()  # one batch in flight: order kept, no duplicates
        self._closed = False
        self._thread = threading.Thread(target=self._batch_loop, name="kensho-otlp", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- the caller's path: keep it to a few hundred nanoseconds ---------------------

    def put(self, event: Mapping[str, Any]) -> None:
        """Queue one finished event for export; drop it (counted) if the queue is full."""
        queue = self._queue
        if len(queue) >= self._max:
            self.dropped += 1
            return
        queue.append((time.time_ns(), event))
        if len(queue) == _BATCH_SIZE:
            self._wake.set()

    # -- the batch thread -----------------------------------------------------------

    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_BATCH_DELAY)
            self._wake.clear()
            self._export_pending()

    def _export_pending(self) -> None:
        """Export everything queued, in batches of at most ``_BATCH_SIZE`` records."""
        with self._batching:
            while self._queue:
                batch = self._next_batch()
                if batch:
                    with contextlib.suppress(Exception):  # never let the thread die
                        self._exporter.export(batch)

    def _next_batch(self) -> list[ReadableLogRecord]:
        queue, batch = self._queue, list[ReadableLogRecord]()
        while queue and len(batch) < _BATCH_SIZE:
            time_ns, event = queue.popleft()
            if str(event.get("service", "")).startswith("opentelemetry"):
                continue  # the SDK's own complaints about exporting would loop
            with contextlib.suppress(Exception):  # one odd event must not stop export
                record = to_log_record(time_ns, event)
                batch.append(ReadableLogRecord(record, self.resource, self._scope))
        return batch

    def flush(self, timeout: float | None = None) -> None:
        """Push every queued record and span out now (or into the spool)."""
        budget = self.settings.timeout if timeout is None else timeout
        self._export_pending()
        self.tracer_provider.force_flush(int(budget * 1000))

    def close(self) -> None:
        """Flush and stop; bounded by the export timeout. Idempotent (also at exit)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(self.settings.timeout)
        self.tracer_provider.shutdown()  # its spans first: their log records follow
        self._export_pending()
        self.shipper.close(self.settings.timeout)
        atexit.unregister(self.close)

    def stats(self) -> dict[str, int]:
        """Counters, in records, for metrics and tests."""
        spool = self.shipper.spool.stats
        return {
            "queue_dropped": self.dropped,
            "sent": self.shipper.sent + spool.sent,
            "rejected": self.shipper.rejected + spool.rejected,
            "spooled": spool.spooled,
            "spool_evicted": spool.evicted,
            "spool_failed": spool.failed,
        }
