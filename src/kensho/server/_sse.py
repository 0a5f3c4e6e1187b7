"""Server-sent events: the framing shared by the completion streams and the status
stream, and the response that sends a completion stream.

:class:`EventStream` replaces Starlette's ``StreamingResponse`` for completions. On an
ASGI 2.3 server (uvicorn) that one runs every response in an anyio task group (a new
task, a cancel scope, a disconnect listener of its own), so the headers wait for an
extra loop turn and each stream pays for three tasks. Here the events are sent from
the request's own task, and the request's :class:`ClientWatch` (one task, started with
the request) notices the client leaving, both before the first token and during the
stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import TypeVar

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["SSE_DONE", "SSE_HEADERS", "ClientGoneError", "ClientWatch", "EventStream", "sse_event"]

#: No caching, and no buffering by a reverse proxy (nginx): every event goes out at once.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: The end of an OpenAI stream.
SSE_DONE = b"data: [DONE]\n\n"

_T = TypeVar("_T")


def sse_event(data: object, *, kind: str | None = None) -> bytes:
    """One event: ``data`` as JSON, under ``event: kind`` when given (OpenAI sends none)."""
    frame = b"data: " + orjson.dumps(data) + b"\n\n"
    return frame if kind is None else f"event: {kind}\n".encode() + frame


class ClientGoneError(Exception):
    """The client went away before its answer was ready.

    A private signal of the HTTP layer (answered with the 499 access-log status),
    never raised to a caller: that is why it is not part of :mod:`kensho.errors`.
    """


class ClientWatch:
    """Notices that a request's client disconnected, and interrupts what it waits for.

    One task (from the first wait on) reads the request's ``receive`` until
    ``http.disconnect``. While the request's task is inside :meth:`until_gone`
    (waiting for its first token, its whole answer, or sending a stream) the
    disconnect cancels it there, and
    :meth:`until_gone` turns that cancellation into :class:`ClientGoneError`; outside
    it the disconnect is only noted (:attr:`gone`), so it never lands in framework
    code between two waits. A cancellation that the watch did not make (the server
    exiting, a task the executor cancelled) goes through unchanged.
    """

    __slots__ = ("_armed", "_fired", "_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - requests always run in a task
            raise RuntimeError("a ClientWatch needs the request's task")
        self._task = task
        self._receive = receive
        self._armed = False
        self._fired = False
        self.gone = False
        # Started at the first wait, after the request was submitted: the executor's
        # runner task, which hands the request to the engine, goes first.
        self._watcher: asyncio.Task[None] | None = None

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._armed:
            self._fired = True
            self._task.cancel("the client disconnected")

    async def until_gone(self, work: Awaitable[_T]) -> _T:
        """Await ``work`` in this task; :class:`ClientGoneError` once the client left."""
        if self.gone:
            raise ClientGoneError
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._receive))
        self._armed = True
        try:
            return await work
        except asyncio.CancelledError:
            if not self._fired:
                raise
            self._fired = False
            self._task.uncancel()  # ours, and handled here: clean-up may await again
            raise ClientGoneError from None
        finally:
            self._armed = False

    def close(self) -> None:
        """The response is over: stop watching."""
        self._armed = False
        if self._watcher is not None:
            self._watcher.cancel()


class EventStream(Response):
    """A ``text/event-stream`` response sent from the request's own task.

    ``events`` yields the encoded events; ``watch`` (the request's) ends the stream
    when the client leaves, and is closed with the response.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        watch: ClientWatch,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        self.watch = watch
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.watch.until_gone(self._send_all(send))
        except ClientGoneError:
            pass  # nobody reads the rest; the task is cancelled as the events end
        finally:
            self.watch.close()
            await self.events.aclose()  # its clean-up runs now, not at garbage collection

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
