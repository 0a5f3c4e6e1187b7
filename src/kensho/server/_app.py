"""The HTTP API: OpenAI-compatible completions plus Kensho's health, metrics and status.

Every completion request goes through the :class:`~kensho.runtime.executor.TaskExecutor`
(priority from ``X-Kensho-Priority``), so overload is answered early and explicitly
(429 with ``Retry-After``) instead of by a request that hangs. A streaming request
waits for its first token *before* the response starts, so queue-phase failures still
get their proper status code (429, 503, 504) rather than a 200 with an error inside.
A client that goes away cancels its task and frees its slot. A shutdown drains
(``_drain.py``): new and not-yet-started work gets 503, streams finish or end with a
final error event; with ``Retry-After`` and an OpenAI-style body throughout.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kensho import __version__
from kensho.errors import KenshoError, QueueFullError
from kensho.events import Event, ServerShutdown
from kensho.runtime.engines.base import ChatMessage, GenerationChunk, GenerationRequest
from kensho.runtime.executor import Priority, TaskHandle
from kensho.server._context import ServerContext
from kensho.server._dashboard import DASHBOARD_PATHS, add_dashboard_routes
from kensho.server._drain import Drain
from kensho.server._errors import APIError, error_body, error_for_exception, error_response
from kensho.server._metrics import CONTENT_TYPE, ServerMetrics
from kensho.server._schemas import BreakerAction, ChatCompletionRequest, CompletionRequest
from kensho.server._status import SNAPSHOT_INTERVAL, StatusBoard
from kensho.server._tracing import TracingMiddleware
from kensho.storage.report import IntegrityStatus
from kensho.telemetry import bound_context, get_logger

__all__ = ["create_app"]

log = get_logger("server")

PRIORITY_HEADER = "x-kensho-priority"
TIMEOUT_HEADER = "x-kensho-timeout"
#: Open even without an API key to browsers of other origins: liveness says nothing.
_ALWAYS_OPEN = frozenset({"/healthz"})
#: Probes and scrapes: open with an API key unless ``protect_metrics`` (vLLM's choice),
#: and still answered while draining (readiness then says 503, draining).
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: Refusals while shutting down say when to come back.
DRAIN_RETRY_AFTER = 5.0
_CLOSE = (b"connection", b"close")
_T = TypeVar("_T")


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready."""


# -- ASGI middleware -------------------------------------------------------------------


class _Guard:
    """Drain, authentication and body-size limit, before any routing or parsing.

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
            await _send_error(send, _shutting_down("this request could not finish in time"))

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
            return _shutting_down("new requests are refused")
        return None

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        key = self.context.api_key or ""
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), key.encode("latin-1", "replace")
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _read_as_json(scope: Scope) -> None:
    """Every body this API takes is JSON: read it as JSON whatever its content type.

    ``curl -d`` sends ``application/x-www-form-urlencoded`` and many clients send no
    type at all; Ollama reads such bodies as JSON, and so does Kensho (a body that is
    not JSON still gets a 400 that says so). The scope is changed in place: the router
    records the matched route in it, which the request metrics read afterwards.
    """
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
    scope["headers"] = [*headers, (b"content-type", b"application/json")]


def _needs_key(ctx: ServerContext, path: str) -> bool:
    """With an API key, every path needs it but the probes (unless ``protect_metrics``)."""
    if path in DASHBOARD_PATHS:  # static files; the page asks for the key itself
        return False
    return ctx.protect_metrics or path not in _PROBE_PATHS


def _shutting_down(why: str, *, code: str = "draining") -> APIError:
    return APIError(
        503,
        f"the server is shutting down: {why}; retry on another instance or after it restarts",
        type="server_error",
        code=code,
        retry_after=DRAIN_RETRY_AFTER,
    )


def _cancelled_at_forced_exit(drain: Drain) -> bool:
    """True for a cancellation of this request's task after the drain was cut off."""
    return drain.cut and asyncio.current_task() is not None


def _cancelled_by_server() -> bool:
    """True when a caught ``CancelledError`` came from the task handle, not this task.

    The executor reports a task it cancelled (shutdown, drain cut-off) by raising
    ``CancelledError`` from the handle; a cancellation of the request's own task
    (client gone, server exit) is pending on the current task instead.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")


async def _send_error(send: Send, err: APIError) -> None:
    response = error_response(err)
    await send(
        {"type": "http.response.start", "status": response.status_code,
         "headers": response.raw_headers}
    )  # fmt: skip
    await send({"type": "http.response.body", "body": response.body})


# -- helpers ---------------------------------------------------------------------------


def _priority(request: Request) -> Priority:
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return Priority.NORMAL
    try:
        return Priority.parse(raw)
    except ValueError as exc:
        raise APIError(400, f"{PRIORITY_HEADER}: {exc}", param=PRIORITY_HEADER) from None


def _timeout(request: Request, default: float | None) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise APIError(
            400, f"{TIMEOUT_HEADER}: expected seconds in (0, 3600], got {raw!r}",
            param=TIMEOUT_HEADER,
        )  # fmt: skip
    return value


def _is_loopback(host: str) -> bool:
    """``localhost``, ``127.x.y.z`` or ``::1`` (brackets allowed)."""
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
        if not _is_loopback(origin_host):
            return f"requests from the web origin {origin} are refused"
    host = _header(scope, b"host")
    if _is_loopback(bound_host) and host and not _is_loopback(_authority_host(host)):
        return f"the Host {host} is not this machine's loopback name"
    return None


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, _T]) -> _T:
    """Run ``work``; if the client disconnects first, cancel it and raise."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if not task.done():
        raise ClientDisconnectedError
    return task.result()  # a task the server cancelled raises CancelledError here


def _sse(data: object) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


# -- the app ---------------------------------------------------------------------------


def create_app(ctx: ServerContext) -> FastAPI:
    """Build the FastAPI application around a booted system."""
    app = FastAPI(
        title="Kensho",
        version=__version__,
        docs_url=None,  # the interactive docs load scripts from a CDN: useless offline
        redoc_url=None,
    )
    metrics = ServerMetrics(ctx)
    app.state.context = ctx
    app.state.metrics = metrics
    app.add_middleware(_Guard, context=ctx, metrics=metrics)
    app.add_middleware(TracingMiddleware)  # outermost: refused requests are traced too
    _add_error_handlers(app)
    _add_health_routes(app, ctx, metrics)
    _add_admin_routes(app, ctx)
    _add_openai_routes(app, ctx, metrics)
    add_dashboard_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"request body is not valid JSON: {first['msg']}"))
        field = ".".join(loc) or None
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        # 400, as OpenAI answers invalid parameters (its client raises BadRequestError).
        return error_response(APIError(400, message, param=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = error_response(APIError(exc.status_code, str(exc.detail), code=code))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response


def _add_health_routes(app: FastAPI, ctx: ServerContext, metrics: ServerMetrics) -> None:
    board = StatusBoard(ctx, metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive: answers while the process runs, draining too (probes need no key,
        unless ``server.protect_metrics``)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready: integrity verified and an engine admits requests; says degraded.

        503 while draining, so an orchestrator stops routing here during a shutdown.
        """
        runtime = ctx.runtime.metrics()
        engine_ready = ctx.runtime.retry_after() == 0
        ready = engine_ready and not ctx.draining and ctx.integrity.status != IntegrityStatus.FAILED
        body = {
            "ready": ready,
            "degraded": runtime.degraded or ctx.integrity.status == IntegrityStatus.DEGRADED,
            "draining": ctx.draining,
            "active_engine": runtime.active_engine,
            "integrity": ctx.integrity.to_dict(),
            "breakers": {
                b.name: str(b.state) for b in (runtime.primary, runtime.fallback) if b is not None
            },
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/kensho/status")
    async def status_stream(request: Request) -> StreamingResponse:
        """Server-sent events: a snapshot (and again every second: queue depth,
        counters), integrity, breaker and overload events as they happen."""

        async def events() -> AsyncIterator[bytes]:
            # A synchronous listener feeding a bounded queue: cleanup needs no await,
            # which matters when the client's disconnect cancels this generator.
            queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=256)

            def listener(event: Event) -> None:
                if queue.full():  # a slow client loses the oldest events, not the newest
                    queue.get_nowait()
                queue.put_nowait(event)

            for past in ctx.hub.history:
                listener(past)
            ctx.hub.add_listener(listener)
            stopping = asyncio.ensure_future(ctx.stopping.wait())
            getter: asyncio.Future[Event] | None = None
            try:
                loop = asyncio.get_running_loop()
                yield b"event: snapshot\n" + _sse(board.snapshot().to_dict())
                due = loop.time() + SNAPSHOT_INTERVAL
                while True:
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait(
                        {getter, stopping},
                        timeout=max(0.0, due - loop.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if getter not in done:
                        getter.cancel()
                    if stopping in done:
                        yield b"event: shutdown\n" + _sse(ServerShutdown().to_dict())
                        return
                    if getter in done:
                        event = getter.result()
                        yield f"event: {event.kind}\n".encode() + _sse(event.to_dict())
                    if loop.time() >= due:  # the state now, events flowing or not
                        yield b"event: snapshot\n" + _sse(board.snapshot().to_dict())
                        due = loop.time() + SNAPSHOT_INTERVAL
            finally:
                ctx.hub.remove_listener(listener)
                stopping.cancel()
                if getter is not None:
                    getter.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


def _add_admin_routes(app: FastAPI, ctx: ServerContext) -> None:

    def _admin_allowed() -> None:
        if not ctx.api_key and not _is_loopback(ctx.host):
            raise APIError(
                403,
                f"admin endpoints are disabled: the server listens on {ctx.host} without an "
                "API key; restart with --api-key (or KENSHO_API_KEY)",
                code="admin_disabled",
            )

    @app.post("/v1/kensho/breaker")
    async def breaker(body: BreakerAction) -> dict[str, Any]:
        """Operate the breakers: ``force_open`` or ``reset`` one, or inject failures.

        ``fail_primary`` makes the primary fail (``times`` calls, or until
        ``heal_primary``) through its breaker exactly like a real fault: the roadmap's
        "methods to force failures", for drills and demos.
        """
        _admin_allowed()
        runtime = ctx.runtime
        if body.action in {"fail_primary", "heal_primary"}:
            runtime.force_primary_failure(body.action == "fail_primary", times=body.times)
            log.info("primary failure injection changed by admin", action=body.action)
            return {"engine": "primary", "state": str(runtime.primary_breaker.state)}
        target = runtime.primary_breaker if body.engine == "primary" else runtime.fallback_breaker
        if target is None:
            raise APIError(404, "this runtime has no fallback engine", param="engine")
        if body.action == "force_open":
            target.force_open("forced open through the admin API")
        else:
            target.reset("reset through the admin API")
        log.info("breaker changed by admin", engine=body.engine, action=body.action)
        return {"engine": body.engine, "state": str(target.state)}

    verifying = asyncio.Lock()

    @app.post("/v1/kensho/verify")
    async def verify() -> dict[str, Any]:
        """Re-verify the store now (full hash) and report; one verification at a time."""
        _admin_allowed()
        if ctx.verify is None:
            raise APIError(404, "this server has no store to verify", code="no_store")
        if verifying.locked():
            raise APIError(409, "a verification is already running", code="verify_running")
        async with verifying:
            ctx.integrity = await ctx.verify()
        return ctx.integrity.to_dict()


def _add_openai_routes(app: FastAPI, ctx: ServerContext, metrics: ServerMetrics) -> None:
    completer = _Completer(ctx, metrics)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": ctx.model_id, "object": "model", "created": 0, "owned_by": "kensho"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        gen = GenerationRequest(
            messages=messages,
            max_tokens=body.max_completion_tokens or body.max_tokens or ctx.default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
        )
        return await completer.complete("chat", body, gen, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            prompt = body.prompt_text()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        gen = GenerationRequest(
            prompt=prompt,
            max_tokens=body.max_tokens or 16,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
        )
        return await completer.complete("text", body, gen, request)


class _Completer:
    """Runs one completion request through the executor and shapes the answer."""

    def __init__(self, ctx: ServerContext, metrics: ServerMetrics) -> None:
        self.ctx = ctx
        self.metrics = metrics

    def _refuse(self, exc: KenshoError | ValueError | APIError) -> APIError:
        err = exc if isinstance(exc, APIError) else _api_error(exc)
        reason = exc.reason if isinstance(exc, QueueFullError) else (err.code or "error")
        self.metrics.rejections.labels(reason).inc()
        return err

    async def complete(
        self,
        kind: Literal["chat", "text"],
        body: ChatCompletionRequest | CompletionRequest,
        gen: GenerationRequest,
        request: Request,
    ) -> Response:
        ctx = self.ctx
        if body.model != ctx.model_id:
            raise APIError(
                404,
                f"model {body.model!r} does not exist here; this server serves "
                f"{ctx.model_id!r} (see GET /v1/models)",
                code="model_not_found",
                param="model",
            )
        if ctx.draining:
            raise _shutting_down("new requests are refused")
        started = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        priority = _priority(request)
        deadline = _timeout(request, ctx.request_timeout)
        with bound_context(request_id=gen.request_id):
            try:
                handle = ctx.executor.submit(gen, priority=priority, deadline=deadline)
            except QueueFullError as exc:
                raise self._refuse(exc) from None
            ctx.drain.admit(handle)
            try:
                first = await self._first(handle, request)
            except ClientDisconnectedError:
                return Response(status_code=499)
            self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - started)
            shape = _Shaper(kind, body.model)
            if body.stream:
                usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = self._stream(handle, first, shape, _Timing(endpoint, started), usage)
                return StreamingResponse(
                    stream, media_type="text/event-stream", headers=_SSE_HEADERS
                )
            try:
                chunks = await self._rest(handle, first, request)
            except ClientDisconnectedError:
                return Response(status_code=499)
            finally:
                ctx.drain.release(handle)
                await handle.aclose()
            for chunk in chunks:
                self.metrics.tokens.labels(chunk.engine).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            return JSONResponse(shape.whole(chunks))

    async def _first(self, handle: TaskHandle, request: Request) -> GenerationChunk | None:
        """The first chunk, before the response starts: failures keep their status."""
        try:
            first = await _unless_disconnected(request, _first(handle))
        except BaseException as exc:
            self.ctx.drain.release(handle)
            await handle.aclose()
            err = self._not_started(exc)
            if err is exc:
                raise
            raise err from None
        self.ctx.drain.producing(handle)  # released when its response ends
        return first

    def _not_started(self, exc: BaseException) -> BaseException:
        """What to raise for a task that failed before its first token."""
        if isinstance(exc, asyncio.CancelledError) and _cancelled_by_server():
            # A drain refusing work that has not started, or the executor closing.
            return self._refuse(_shutting_down("this request had not started and was dropped"))
        if isinstance(exc, (KenshoError, ValueError)):
            return self._refuse(exc)
        return exc

    async def _rest(
        self, handle: TaskHandle, first: GenerationChunk | None, request: Request
    ) -> list[GenerationChunk]:
        """Every chunk of a whole (non-streamed) answer."""
        try:
            return await _unless_disconnected(request, _rest(handle, first))
        except asyncio.CancelledError:
            if _cancelled_by_server():  # cut off at the end of a drain
                raise _shutting_down(
                    "this answer could not finish in time", code="shutdown"
                ) from None
            raise
        except (KenshoError, ValueError) as exc:
            raise self._refuse(exc) from None

    async def _stream(
        self,
        handle: TaskHandle,
        first: GenerationChunk | None,
        shape: _Shaper,
        timing: _Timing,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        count = 0
        try:
            yield _sse(shape.opening())
            chunk = first
            while chunk is not None:
                count += 1
                self.metrics.tokens.labels(chunk.engine).inc()
                yield _sse(shape.delta(chunk))
                chunk = await anext(handle, None)
            if include_usage:
                yield _sse(shape.usage_chunk(count))
            yield _DONE
        except (KenshoError, ValueError) as exc:
            log.warning("stream ended by an error", error=str(exc), tokens=count)
            yield _sse(error_body(_api_error(exc)))
            yield _DONE
        except asyncio.CancelledError:
            if not _cancelled_by_server():
                raise  # the client went away, or the server is exiting
            # Cut off at the end of a drain: say so in the stream (the openai client
            # raises it as an APIError) rather than cutting the connection.
            log.warning("stream cut off at shutdown", tokens=count)
            err = _shutting_down("this stream could not finish in time", code="shutdown")
            yield _sse(error_body(err))
            yield _DONE
        finally:
            # Measured first: a disconnect may cancel the awaits below.
            elapsed = time.perf_counter() - timing.started
            self.metrics.latency.labels(timing.endpoint).observe(elapsed)
            self.ctx.drain.release(handle)
            handle.cancel("the response ended")  # no-op once the task has ended
            await handle.aclose()


@dataclass(frozen=True, slots=True)
class _Timing:
    endpoint: str
    started: float


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def _api_error(exc: KenshoError | ValueError) -> APIError:
    """The HTTP error for a failed completion: a bad request is the client's (400)."""
    if isinstance(exc, ValueError) and not isinstance(exc, KenshoError):
        return APIError(400, str(exc))
    return error_for_exception(exc) or APIError(500, str(exc), type="server_error")


async def _first(handle: TaskHandle) -> GenerationChunk | None:
    return await anext(handle, None)


async def _rest(handle: TaskHandle, first: GenerationChunk | None) -> list[GenerationChunk]:
    chunks = [first] if first is not None else []
    chunks += [chunk async for chunk in handle]
    return chunks


class _Shaper:
    """Builds OpenAI response objects for one request (chat or text completion)."""

    def __init__(self, kind: Literal["chat", "text"], model: str) -> None:
        self.kind = kind
        self.model = model
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def opening(self) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
            }
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def delta(self, chunk: GenerationChunk) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {
                "index": 0,
                "delta": {"content": chunk.text},
                "finish_reason": chunk.finish_reason,
            }
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {
            "index": 0,
            "text": chunk.text,
            "logprobs": None,
            "finish_reason": chunk.finish_reason,
        }
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": _usage(tokens)}

    def whole(self, chunks: list[GenerationChunk]) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        finish = chunks[-1].finish_reason if chunks else "stop"
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish or "stop",
            }
            base = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish or "stop"}
            base = self._base("text_completion")
        return {**base, "choices": [choice], "usage": _usage(len(chunks))}


def _usage(completion_tokens: int) -> dict[str, int]:
    # Engines report generated tokens only; prompt tokens are not counted (0).
    return {
        "prompt_tokens": 0,
        "completion_tokens": completion_tokens,
        "total_tokens": completion_tokens,
    }
