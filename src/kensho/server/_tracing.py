"""A span per HTTP request, child of the caller's W3C ``traceparent`` when it sends one.

Registered as the outermost ASGI middleware, so requests the guard refuses (401,
413, 503 while draining) are traced too, and a streamed answer's span lasts until
its last byte. Without OTLP export configured it passes requests straight through.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kensho.telemetry import log_service

__all__ = ["TracingMiddleware"]

_PROPAGATED = (b"traceparent", b"tracestate")


class TracingMiddleware:
    """``POST /v1/chat/completions`` spans with method, path and status attributes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        export = log_service().export
        if scope["type"] != "http" or export is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", [])
            if name in _PROPAGATED
        }
        parent = TraceContextTextMapPropagator().extract(carrier)
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": path}
        with export.tracer.start_as_current_span(
            f"{method} {path}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_traced)
