"""The HTTP API: the FastAPI app, its error handlers and the small route groups.

:func:`create_app` assembles one server around a booted system: the access guard
(``_guard.py``) before any routing, the OpenAI routes (``_openai.py``), the status
stream (``_status.py``), the dashboard, and here the health probes and admin routes.
A shutdown drains (``_drain.py``): new and not-yet-started work gets 503, streams
finish or end with a final error event; with ``Retry-After`` and an OpenAI-style body
throughout.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kensho import __version__
from kensho.errors import KenshoError
from kensho.server._chunks import add_chunk_routes
from kensho.server._context import ServerContext
from kensho.server._dashboard import add_dashboard_routes
from kensho.server._errors import APIError, error_response, invalid_body
from kensho.server._guard import AccessGuard, is_loopback
from kensho.server._metrics import CONTENT_TYPE, ServerMetrics
from kensho.server._openai import add_openai_routes
from kensho.server._schemas import BreakerAction
from kensho.server._status import StatusBoard, add_status_route
from kensho.server._tracing import TracingMiddleware
from kensho.storage.report import IntegrityStatus
from kensho.telemetry import get_logger

__all__ = ["create_app"]

log = get_logger("server")


def create_app(ctx: ServerContext) -> FastAPI:
    """Build the FastAPI application around a booted system."""
    app = FastAPI(
        title="Kensho",
        version=__version__,
        docs_url=None,  # the interactive docs load scripts from a CDN: useless offline
        redoc_url=None,
        # Spans, metrics and logs come from Kensho's own telemetry (TracingMiddleware,
        # /metrics, the log service); FastAPI's native OpenTelemetry would only look up
        # the global providers on every request (or trace each request twice).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    metrics = ServerMetrics(ctx)
    app.state.context = ctx
    app.state.metrics = metrics
    app.add_middleware(AccessGuard, context=ctx, metrics=metrics)
    app.add_middleware(TracingMiddleware)  # outermost: refused requests are traced too
    _add_error_handlers(app)
    _add_health_routes(app, ctx, metrics)
    add_status_route(app, StatusBoard(ctx, metrics))
    _add_admin_routes(app, ctx)
    add_openai_routes(app, ctx, metrics)
    if ctx.chunks is not None:  # verified chunks for peers (share.enabled)
        add_chunk_routes(app, ctx.chunks)
    add_dashboard_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_body(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = error_response(APIError(exc.status_code, str(exc.detail), code=code))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response


def _add_health_routes(app: FastAPI, ctx: ServerContext, metrics: ServerMetrics) -> None:

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


def _add_admin_routes(app: FastAPI, ctx: ServerContext) -> None:

    def _admin_allowed() -> None:
        if not ctx.api_key and not is_loopback(ctx.host):
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

    @app.post("/v1/kensho/update")
    async def update() -> dict[str, Any]:
        """Apply the fully staged release now (live: engines reload one at a time
        behind the breakers); ``applied`` is false when nothing newer is staged."""
        _admin_allowed()
        if ctx.apply_update is None:
            raise APIError(404, "this server has no store to update", code="no_store")
        try:
            return await ctx.apply_update()
        except KenshoError as exc:  # refused, or rolled back: the store serves as before
            raise APIError(409, str(exc), code="update_failed") from exc
