"""The access guard: what a request must pass before any routing or parsing.

One plain ASGI middleware, :class:`AccessGuard`, answers in order: a browser of another
web origin or a rebound DNS name (keyless servers only), the API key (which paths need
it), the drain (new work is refused while shutting down), and the body-size limit;
then it reads every body as JSON whatever its content type. It also counts every
request, for ``/metrics`` and for the drain.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kensho.server._context import ServerContext
from kensho.server._dashboard import DASHBOARD_PATHS
from kensho.server._drain import Drain, shutting_down
from kensho.server._errors import APIError, error_response
from kensho.server._metrics import ServerMetrics
from kensho.telemetry import get_logger

__all__ = ["AccessGuard", "bearer_ok", "is_loopback"]

log = get_logger("server")

#: Open even without an API key to browsers of other origins: liveness says nothing.
_ALWAYS_OPEN = frozenset({"/healthz"})
#: Probes and scrapes: open with an API key unless ``protect_metrics`` (vLLM's choice),
#: and still answered while draining (readiness then says 503, draining).
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CLOSE = (b"connection", b"close")


class AccessGuard:
    """Origin, API key, drain and body-size limit, before any routing or parsing.

    Bodies are read here (up to the limit) and replayed to the app, so an oversize
    body is refused with 413 without ever being parsed; later ``receive`` calls go to
    the server, which is how disconnects are still seen. Every request is counted in
    the :class:`~kensho.server._drain.Drain`, so a shutdown knows when it is over.
    """

    def __init__(self, app: ASGIApp, context: ServerContext, metrics: ServerMetrics) -> None:
        self.app = app
        self.context = context
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]
        drain = self.context.drain

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if drain.draining:  # keep-alive clients reconnect (elsewhere) next time
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        try:
            with drain.request():
                await self._guarded(scope, receive, counting_send)
        except asyncio.CancelledError:
            if not _cancelled_at_forced_exit(drain):
                raise
            await self._end_cancelled(scope, counting_send, started=bool(status[0]))
        finally:
            # Counted here, in plain ASGI: Starlette's BaseHTTPMiddleware would add a
            # task and a memory stream to every request and every streamed chunk.
            route = getattr(scope.get("route"), "path", "unmatched")
            # No response started: the client left first (499, as nginx counts it).
            self.metrics.requests.labels(route, str(status[0] or 499)).inc()

    async def _end_cancelled(self, scope: Scope, send: Send, *, started: bool) -> None:
        """A request the server cancelled at a forced exit: one log line, no dump.

        Completions end themselves at the cut-off; this is for what could not (a
        client that stopped reading, a long admin call) once the grace ran out.
        """
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # handled: the request ends here
        log.warning("request cancelled at exit", path=scope["path"], response_started=started)
        if not started:
            await _send_error(send, shutting_down("this request could not finish in time"))

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_error(send, refusal)
            return
        ctx = self.context
        if scope["method"] not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > ctx.max_body_bytes:
            await _send_error(send, _too_large(ctx.max_body_bytes))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > ctx.max_body_bytes:
                await _send_error(send, _too_large(ctx.max_body_bytes))
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        _read_as_json(scope)
        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope) -> APIError | None:
        """Why the request is refused before it is read, or None: origin, key, drain."""
        ctx = self.context
        path = scope["path"]
        if not ctx.api_key and path not in _ALWAYS_OPEN:
            problem = _browser_problem(scope, ctx.host)
            if problem:
                why = f"{problem}; set an API key (--api-key) to serve other clients"
                return APIError(403, why, code="origin_refused")
        if ctx.api_key and _needs_key(ctx, path) and not self._authorized(scope):
            return APIError(
                401,
                "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if ctx.draining and path not in _PROBE_PATHS:
            return shutting_down("new requests are refused")
        return None

    def _authorized(self, scope: Scope) -> bool:
        return bearer_ok(scope, self.context.api_key or "")


def bearer_ok(scope: Scope, key: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <key>`` (constant-time)."""
    value = _header(scope, b"authorization") or ""
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("latin-1"), key.encode("latin-1", "replace")
    )


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (ASGI servers lowercase header names, and
    Starlette relies on it too: no case folding per header and request here)."""
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _read_as_json(scope: Scope) -> None:
    """Every body this API takes is JSON: read it as JSON whatever its content type.

    ``curl -d`` sends ``application/x-www-form-urlencoded`` and many clients send no
    type at all; Ollama reads such bodies as JSON, and so does Kensho (a body that is
    not JSON still gets a 400 that says so). The scope is changed in place: the router
    records the matched route in it, which the request metrics read afterwards.
    """
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
    scope["headers"] = [*headers, (b"content-type", b"application/json")]


def _needs_key(ctx: ServerContext, path: str) -> bool:
    """With an API key, every path needs it but the probes (unless ``protect_metrics``)."""
    if path in DASHBOARD_PATHS:  # static files; the page asks for the key itself
        return False
    return ctx.protect_metrics or path not in _PROBE_PATHS


def _cancelled_at_forced_exit(drain: Drain) -> bool:
    """True for a cancellation of this request's task after the drain was cut off."""
    return drain.cut and asyncio.current_task() is not None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")


async def _send_error(send: Send, err: APIError) -> None:
    response = error_response(err)
    await send(
        {"type": "http.response.start", "status": response.status_code,
         "headers": response.raw_headers}
    )  # fmt: skip
    await send({"type": "http.response.body", "body": response.body})


@functools.lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    """``localhost``, ``127.x.y.z`` or ``::1`` (brackets allowed).

    Cached: every keyless request asks it of the same few ``Host`` values, and parsing
    an address costs more than the rest of the origin check.
    """
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authority_host(authority: str) -> str:
    """The host of ``host[:port]`` or ``[v6][:port]``."""
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _browser_problem(scope: Scope, bound_host: str) -> str | None:
    """Why a keyless request must be refused: another site or a rebound DNS name.

    Without an API key, a loopback server trusts whoever can reach it; a web page in
    the user's browser can too, unless requests from other origins (``Origin``) and
    for other names (``Host``, DNS rebinding) are refused.
    """
    origin = _header(scope, b"origin")
    if origin and origin != "null":
        origin_host = _authority_host(origin.split("://", 1)[-1].split("/", 1)[0])
        if not is_loopback(origin_host):
            return f"requests from the web origin {origin} are refused"
    host = _header(scope, b"host")
    if is_loopback(bound_host) and host and not is_loopback(_authority_host(host)):
        return f"the Host {host} is not this machine's loopback name"
    return None
