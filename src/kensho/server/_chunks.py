"""Verified chunks for peers: ``GET /v1/kensho/chunks/{sha256}``, and ``kensho share``'s app.

Another store on the site (a :class:`~kensho.storage.sources.PeerSource`) asks for
chunks by hash; this answers from the :class:`~kensho.storage.shelf.ChunkShelf`:
only chunks of files whose last check passed, hashed again as they are read. A
chunk that is not here is a quick 404 with a small body. One ``Range`` per request
is honoured (206 with ``Content-Range``); several are answered with the whole chunk,
as RFC 9110 allows.

The cost to the serving device is bounded (``[share]``): at most ``max_transfers``
chunk bodies at once (more get 429 with ``Retry-After``: the peer asks its next
source) and at most ``rate_limit`` bytes/s in all, paced on the way out (Dragonfly's
upload rate limit). The API key is the server's: ``kensho up``'s access guard, or
``kensho share``'s own (:func:`create_share_app`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kensho import __version__
from kensho.config import ShareSettings
from kensho.runtime.clock import AsyncioClock, Clock
from kensho.server._errors import APIError, error_response
from kensho.server._guard import _browser_problem, bearer_ok
from kensho.storage.shelf import ChunkReader, ChunkShelf, ShelvedChunk
from kensho.storage.sources import CHUNK_ROUTE
from kensho.telemetry import get_logger

__all__ = ["ChunkService", "UploadPacer", "add_chunk_routes", "create_share_app", "parse_range"]

log = get_logger("server.share")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class UploadPacer:
    """A token bucket of ``rate`` bytes/s shared by every chunk body (0: unlimited).

    :meth:`take` lets ``n`` bytes go now if the bucket (at most one second's worth)
    holds them, else sleeps on ``clock`` until they are paid for. Concurrent bodies
    each pay their own debt, so together they never exceed the rate.
    """

    def __init__(self, rate: int, clock: Clock | None = None) -> None:
        self.rate = rate
        self._clock: Clock = clock or AsyncioClock()
        self._tokens = float(rate)
        self._last = self._clock.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = self._clock.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await self._clock.sleep(-self._tokens / self.rate)


@dataclass
class ChunkService:
    """The shelf a server shares, and the limits it shares it under."""

    shelf: ChunkShelf
    max_transfers: int = 8
    pacer: UploadPacer = field(default_factory=lambda: UploadPacer(0))
    sending: int = 0
    served_bytes: int = 0

    @classmethod
    def for_store(cls, root: Path, settings: ShareSettings) -> ChunkService:
        return cls(ChunkShelf(root), settings.max_transfers, UploadPacer(settings.rate_limit))

    def close(self) -> None:
        self.shelf.close()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single ``Range`` on ``size`` bytes.

    ``None``: send everything (no header, several ranges, another unit). Raises
    ``ValueError`` for a range that cannot be satisfied (answered 416).
    """
    if not header or "," in header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        raise ValueError(header)
    if not first:  # the last N bytes
        return max(0, size - int(last)), size
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        raise ValueError(header)
    return start, end


def add_chunk_routes(app: FastAPI, service: ChunkService) -> None:
    """Serve ``service``'s shelf at :data:`~kensho.storage.sources.CHUNK_ROUTE`."""

    @app.get(CHUNK_ROUTE)
    async def chunk(sha256: str, request: Request) -> Response:
        """A verified chunk of this store by its SHA-256 (64 lowercase hex digits)."""
        if not _SHA256.fullmatch(sha256):
            raise APIError(
                400, f"{sha256!r} is not a SHA-256 (64 lowercase hex digits)", param="sha256"
            )
        found = await asyncio.to_thread(service.shelf.find, sha256)
        if found is None:
            raise APIError(404, f"no verified chunk {sha256} here", code="chunk_not_found")
        try:
            span = parse_range(request.headers.get("range"), found.size)
        except ValueError:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{found.size}"})
        if service.sending >= service.max_transfers:
            raise APIError(
                429,
                f"this store already sends {service.max_transfers} chunks (share.max_transfers)",
                type="rate_limit_error",
                code="share_busy",
                retry_after=1.0,
            )
        reader = await asyncio.to_thread(service.shelf.open, found)
        if reader is None:
            raise APIError(404, f"no verified chunk {sha256} here", code="chunk_not_found")
        return _chunk_response(service, found, reader, span)


def _chunk_response(
    service: ChunkService, found: ShelvedChunk, reader: ChunkReader, span: tuple[int, int] | None
) -> Response:
    start, end = span if span is not None else (0, found.size)
    reader.select(start, end)
    headers = {
        "Content-Length": str(end - start),
        "Accept-Ranges": "bytes",
        "ETag": f'"{found.sha256}"',
        "Cache-Control": "public, max-age=31536000, immutable",  # content-addressed
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{found.size}"
    return StreamingResponse(
        _body(service, reader),
        status_code=206 if span is not None else 200,
        headers=headers,
        media_type="application/octet-stream",
    )


async def _body(service: ChunkService, reader: ChunkReader) -> AsyncIterator[bytes]:
    """The chunk's bytes, paced; cut short (never completed) if they no longer match."""
    service.sending += 1
    try:
        while piece := await asyncio.to_thread(reader.read):
            await service.pacer.take(len(piece))
            service.served_bytes += len(piece)
            yield piece
    except (ValueError, OSError) as exc:
        log.warning("stopped sending a chunk", chunk=reader.chunk.sha256, error=str(exc))
    finally:
        service.sending -= 1
        reader.close()


class _KeyGuard:
    """``kensho share``'s access check, as ``kensho up``'s guard does it: with a key, the
    Bearer key on every path but ``/healthz``; without one, no other web origin and no
    rebound DNS name (a web page must not read the store through the browser)."""

    def __init__(self, app: ASGIApp, api_key: str | None, host: str) -> None:
        self.app = app
        self.api_key = api_key
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await error_response(refusal)(scope, receive, send)

    def _refusal(self, scope: Scope) -> APIError | None:
        if scope["path"] == "/healthz":
            return None
        if not self.api_key:
            problem = _browser_problem(scope, self.host)
            if problem is None:
                return None
            return APIError(403, f"{problem}; share with --api-key", code="origin_refused")
        if bearer_ok(scope, self.api_key):
            return None
        return APIError(
            401,
            "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


def create_share_app(
    service: ChunkService, *, api_key: str | None = None, host: str = "127.0.0.1"
) -> FastAPI:
    """The app of ``kensho share`` bound to ``host``: a store's verified chunks, and a
    liveness probe."""
    app = FastAPI(title="Kensho share", version=__version__, docs_url=None, redoc_url=None)
    app.add_middleware(_KeyGuard, api_key=api_key, host=host)

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "chunks": await asyncio.to_thread(len, service.shelf)}

    add_chunk_routes(app, service)
    return app
