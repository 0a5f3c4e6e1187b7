"""Server-sent events framing, shared by the completion streams and the status stream."""

from __future__ import annotations

import orjson

__all__ = ["SSE_DONE", "SSE_HEADERS", "sse_event"]

#: No caching, and no buffering by a reverse proxy (nginx): every event goes out at once.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: The end of an OpenAI stream.
SSE_DONE = b"data: [DONE]\n\n"


def sse_event(data: object, *, kind: str | None = None) -> bytes:
    """One event: ``data`` as JSON, under ``event: kind`` when given (OpenAI sends none)."""
    frame = b"data: " + orjson.dumps(data) + b"\n\n"
    return frame if kind is None else f"event: {kind}\n".encode() + frame
