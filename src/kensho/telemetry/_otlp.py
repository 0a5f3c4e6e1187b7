"""OTLP/HTTP export of Kensho's log records and spans, with the disk spool behind it.

The path of one log event, and who pays for each step:

1. the caller: :meth:`OtlpExport.put` appends the finished event dict to a bounded
   deque (a few hundred ns; a full queue drops the event with a counter, never
   blocks). That is all the caller's thread ever does for export;
2. the batch thread wakes every second (or at 512 queued) and encodes the queued
   events straight into one OTLP ``ExportLogsServiceRequest`` with
   opentelemetry-proto (:mod:`._encoding`: 5-9 µs a record, against about 45 µs
   through the SDK's ``LogRecord`` objects and encoder, time during which the
   thread holds the GIL the callers need). The deque is the one bounded queue:
   the SDK's ``BatchLogRecordProcessor`` would be a second one, dropping records
   without our counter while the collector is slow;
3. the shipper posts the bytes, or puts them in the :class:`~._spool.Spool` when the
   collector is unreachable, times out, or answers 429/5xx; its drain thread sends
   spooled batches, oldest first, once the collector answers again.

Spans are few (one per request, boot, verify): the SDK's ``TracerProvider`` makes
them, a span processor appends each ended span to a second bounded deque, and the
same batch thread encodes them with the SDK's span encoder and hands them to the
same shipper. Every step counts what it sent, spooled or lost, per signal
(:meth:`OtlpExport.stats`, exposed on ``/metrics``).

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from kensho.config import TelemetrySettings
from kensho.telemetry._encoding import LogBatchEncoder
from kensho.telemetry._spool import Outcome, Spool

__all__ = ["SIGNALS", "OtlpExport", "build_resource"]

# OTLP's names for the two signals, also the spool files' and the metric label's.
SIGNALS: tuple[Literal["logs"], Literal["traces"]] = ("logs", "traces")
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


class _Sender:
    """One POST of a serialized OTLP request; no retries (the spool is the retry)."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.urls: dict[str, str | None] = {s: settings.signal_url(s) for s in SIGNALS}
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


@dataclass
class _Sent:
    """What the shipper's direct attempts did for one signal."""

    sent: int = 0  # records the collector accepted at once
    rejected: int = 0  # records refused with a 4xx other than 429: dropped
    errors: int = 0  # requests that failed: unreachable, timed out, 429, 5xx or 4xx


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
        self.direct: dict[str, _Sent] = {signal: _Sent() for signal in SIGNALS}
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._drain_loop, name="kensho-otlp-spool", daemon=True
        )
        self._thread.start()

    def submit(self, signal: str, payload: bytes, records: int) -> None:
        if time.monotonic() >= self._retry_at and not self.spool.pending():
            outcome = self.send(signal, payload)
            if outcome is Outcome.SENT:
                self.direct[signal].sent += records
                return
            if outcome is Outcome.REJECTED:
                self.direct[signal].rejected += records
                return
            self._retry_at = time.monotonic() + self.retry_interval
        self.spool.put(signal, payload, records)  # counts it as failed when it cannot
        self._wake.set()

    def send(self, signal: str, payload: bytes) -> Outcome:
        """One attempt, counted as an export error unless the collector took it."""
        outcome = self.sender.send(signal, payload)
        if outcome is not Outcome.SENT:
            self.direct[signal].errors += 1
        return outcome

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
            if not self.spool.drain(self.send, deadline):
                self._retry_at = time.monotonic() + self.retry_interval
                return
            self._retry_at = 0.0

    def close(self, budget: float) -> None:
        """Stop the drain thread; one last drain while the collector answers."""
        self._stop.set()
        self._wake.set()
        self._thread.join(budget)
        self.drain_once(deadline=time.monotonic() + budget)


class _SpanQueue(SpanProcessor):
    """Hands each ended span to the export's bounded span queue (no thread of its own)."""

    def __init__(self, export: OtlpExport) -> None:
        self._export = export

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        self._export.put_span(span)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class _Queue:
    """A bounded deque of one signal's items waiting for the batch thread."""

    def __init__(self, limit: int) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self.limit = limit
        self.dropped = 0  # items refused because the queue was full

    def take(self, count: int) -> list[Any]:
        items, batch = self.items, list[Any]()
        while items and len(batch) < count:
            batch.append(items.popleft())
        return batch


class OtlpExport:
    """Everything one configured export owns: queues, threads, SDK pieces, spool."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.resource = build_resource(settings)
        self.shipper = _Shipper(settings)
        self._encoder = LogBatchEncoder(
            self.resource.attributes, "kensho", self.resource.schema_url
        )
        self.tracer_provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
        self._logs = _Queue(settings.queue_size)
        self._spans = _Queue(settings.queue_size)
        self._queue = self._logs.items  # the caller's path reads it without a lookup
        self._max = settings.queue_size
        if settings.signal_url("traces") is not None:
            self.tracer_provider.add_span_processor(_SpanQueue(self))
        self.tracer = self.tracer_provider.get_tracer("kensho")
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
            self._logs.dropped += 1
            return
        queue.append((time.time_ns(), event))
        if len(queue) == _BATCH_SIZE:
            self._wake.set()

    def put_span(self, span: ReadableSpan) -> None:
        """Queue one ended span; drop it (counted) if the queue is full."""
        spans = self._spans
        if len(spans.items) >= spans.limit:
            spans.dropped += 1
            return
        spans.items.append(span)

    # -- the batch thread -----------------------------------------------------------

    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_BATCH_DELAY)
            self._wake.clear()
            self._export_pending()

    def _export_pending(self) -> None:
        """Export everything queued, in batches of at most ``_BATCH_SIZE`` each."""
        with self._batching:
            while self._spans.items:  # spans first: a request's records follow its span
                spans = self._spans.take(_BATCH_SIZE)
                with contextlib.suppress(Exception):  # never let the thread die
                    payload = encode_spans(spans).SerializeToString()
                    self.shipper.submit("traces", payload, len(spans))
            while self._logs.items:
                events = [
                    item
                    for item in self._logs.take(_BATCH_SIZE)
                    # the SDK's own complaints about exporting would loop
                    if not str(item[1].get("service", "")).startswith("opentelemetry")
                ]
                if events:
                    with contextlib.suppress(Exception):  # never let the thread die
                        payload, records = self._encoder.encode(events)
                        if records:
                            self.shipper.submit("logs", payload, records)

    def flush(self) -> None:
        """Push every queued record and span out now (or into the spool), on this thread."""
        self._export_pending()

    def close(self) -> None:
        """Flush and stop; bounded by the export timeout. Idempotent (also at exit)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(self.settings.timeout)
        self.tracer_provider.shutdown()
        self._export_pending()
        self.shipper.close(self.settings.timeout)
        atexit.unregister(self.close)

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per signal (``logs`` in records, ``traces`` in spans), for metrics.

        ``exported`` is what the collector accepted, at once or from the spool;
        ``spooled`` what went to disk; ``queue_dropped``, ``spool_evicted``,
        ``spool_failed``, ``rejected`` and ``unencodable`` what was lost, and why;
        ``export_errors`` counts failed requests (batches, not records); ``queued``
        is what waits in memory now.
        """
        out: dict[str, dict[str, int]] = {}
        for signal, queue in (("logs", self._logs), ("traces", self._spans)):
            spool, direct = self.shipper.spool.stats_for(signal), self.shipper.direct[signal]
            out[signal] = {
                "exported": direct.sent + spool.sent,
                "spooled": spool.spooled,
                "queue_dropped": queue.dropped,
                "spool_evicted": spool.evicted,
                "spool_failed": spool.failed,
                "rejected": direct.rejected + spool.rejected,
                "unencodable": self._encoder.failed if signal == "logs" else 0,
                "export_errors": direct.errors,
                "queued": len(queue.items),
            }
        return out
