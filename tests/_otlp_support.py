"""A real OTLP/HTTP collector on 127.0.0.1 that decodes what it receives (protobuf)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass
class Received:
    """One decoded log record or span, with its resource."""

    resource: dict[str, Any]
    attributes: dict[str, Any]
    body: Any = None
    name: str = ""
    severity_text: str = ""
    severity_number: int = 0
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""


@dataclass
class Collector:
    port: int = 0
    status: int = 200  # what to answer
    delay: float = 0.0  # seconds before answering (a slow collector)
    logs: list[Received] = field(default_factory=list)
    spans: list[Received] = field(default_factory=list)
    requests: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if collector.delay:
                    time.sleep(collector.delay)  # the fault under test: a slow collector
                status = collector.status
                if status == 200:
                    collector._record(self.path, body, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _record(self, path: str, body: bytes, headers: dict[str, str]) -> None:
        with self._changed:
            self.requests += 1
            self.headers.append(headers)
            if path == "/v1/logs":
                self._decode_logs(body)
            elif path == "/v1/traces":
                self._decode_spans(body)
            self._changed.notify_all()

    def _decode_logs(self, body: bytes) -> None:
        request = ExportLogsServiceRequest.FromString(body)
        for rl in request.resource_logs:
            resource = {kv.key: any_value(kv.value) for kv in rl.resource.attributes}
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    self.logs.append(
                        Received(
                            resource=resource,
                            attributes={kv.key: any_value(kv.value) for kv in r.attributes},
                            body=any_value(r.body),
                            severity_text=r.severity_text,
                            severity_number=r.severity_number,
                            trace_id=r.trace_id.hex(),
                            span_id=r.span_id.hex(),
                        )
                    )

    def _decode_spans(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Received(
                            resource=resource,
                            attributes={kv.key: any_value(kv.value) for kv in s.attributes},
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                        )
                    )

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        """Block until ``predicate(self)`` holds (an observable event, not a sleep)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(
                    f"collector: condition not met in {timeout:g} s "
                    f"({len(self.logs)} records, {len(self.spans)} spans)"
                )

    def bodies(self) -> list[Any]:
        with self._changed:
            return [r.body for r in self.logs]


@contextmanager
def running_collector(**kwargs: Any) -> Iterator[Collector]:
    collector = Collector(**kwargs)
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()
