"""The OpenAI routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Every completion goes through the :class:`~kensho.runtime.executor.TaskExecutor`
(priority from ``X-Kensho-Priority``, deadline from ``X-Kensho-Timeout``), so overload
is answered early and explicitly (429 with ``Retry-After``) instead of by a request
that hangs. :class:`CompletionRunner` waits for the first token *before* the response
starts, so queue-phase failures still get their proper status code (429, 503, 504)
rather than a 200 with an error inside; a client that goes away cancels its task and
frees its slot; at a drain's cut-off a stream ends with an error event, a whole answer
with a 503. :class:`OpenAIShaper` builds the OpenAI response objects.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kensho.errors import KenshoError, QueueFullError
from kensho.runtime.engines.base import GenerationChunk, GenerationRequest
from kensho.runtime.executor import Priority, TaskHandle
from kensho.server._context import ServerContext
from kensho.server._drain import shutting_down
from kensho.server._errors import APIError, error_body, error_for_exception
from kensho.server._metrics import ServerMetrics
from kensho.server._schemas import ChatCompletionRequest, CompletionRequest
from kensho.server._sse import SSE_DONE, SSE_HEADERS, sse_event
from kensho.server._tools import ToolShaper, chat_messages, structured_options
from kensho.telemetry import bound_context, get_logger

__all__ = [
    "PRIORITY_HEADER",
    "TIMEOUT_HEADER",
    "CompletionRunner",
    "OpenAIShaper",
    "add_openai_routes",
]

log = get_logger("server")

PRIORITY_HEADER = "x-kensho-priority"
TIMEOUT_HEADER = "x-kensho-timeout"
_T = TypeVar("_T")


class _ClientGoneError(Exception):
    """The client went away before its answer was ready.

    A private signal inside this module (answered with the 499 access-log status),
    never raised to a caller: that is why it is not part of :mod:`kensho.errors`.
    """


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
        raise _ClientGoneError
    return task.result()  # a task the server cancelled raises CancelledError here


def _cancelled_by_server() -> bool:
    """True when a caught ``CancelledError`` came from the task handle, not this task.

    The executor reports a task it cancelled (shutdown, drain cut-off) by raising
    ``CancelledError`` from the handle; a cancellation of the request's own task
    (client gone, server exit) is pending on the current task instead.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def add_openai_routes(app: FastAPI, ctx: ServerContext, metrics: ServerMetrics) -> None:
    """The OpenAI routes; each completion turns its body into a ``GenerationRequest``."""
    runner = CompletionRunner(ctx, metrics)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": ctx.model_id, "object": "model", "created": 0, "owned_by": "kensho"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        gen = GenerationRequest(
            messages=chat_messages(body),
            max_tokens=body.max_completion_tokens or body.max_tokens or ctx.default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
            **structured_options(body, ctx.runtime),
        )
        return await runner.complete("chat", body, gen, request)

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
        return await runner.complete("text", body, gen, request)


class CompletionRunner:
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
            raise shutting_down("new requests are refused")
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
                first = await self._first_token(handle, request)
            except _ClientGoneError:
                return Response(status_code=499)
            self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - started)
            plain = OpenAIShaper(kind, body.model)
            calling = bool(gen.tools) and gen.tool_choice != "none"
            shape: Shaper = ToolShaper(plain) if calling else plain
            if body.stream:
                usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = self._stream_answer(
                    handle, first, shape, _Timing(endpoint, started), usage
                )
                return StreamingResponse(
                    stream, media_type="text/event-stream", headers=SSE_HEADERS
                )
            try:
                chunks = await self._whole_answer(handle, first, request)
            except _ClientGoneError:
                return Response(status_code=499)
            finally:
                ctx.drain.release(handle)
                await handle.aclose()
            for chunk in chunks:
                self.metrics.tokens.labels(chunk.engine).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            return JSONResponse(shape.whole(chunks))

    async def _first_token(self, handle: TaskHandle, request: Request) -> GenerationChunk | None:
        """The first chunk, before the response starts: failures keep their status."""
        try:
            first = await _unless_disconnected(request, _first_chunk(handle))
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
            return self._refuse(shutting_down("this request had not started and was dropped"))
        if isinstance(exc, (KenshoError, ValueError)):
            return self._refuse(exc)
        return exc

    async def _whole_answer(
        self, handle: TaskHandle, first: GenerationChunk | None, request: Request
    ) -> list[GenerationChunk]:
        """Every chunk of a whole (non-streamed) answer."""
        try:
            return await _unless_disconnected(request, _all_chunks(handle, first))
        except asyncio.CancelledError:
            if _cancelled_by_server():  # cut off at the end of a drain
                raise shutting_down(
                    "this answer could not finish in time", code="shutdown"
                ) from None
            raise
        except (KenshoError, ValueError) as exc:
            raise self._refuse(exc) from None

    async def _stream_answer(
        self,
        handle: TaskHandle,
        first: GenerationChunk | None,
        shape: Shaper,
        timing: _Timing,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        count = 0
        try:
            yield sse_event(shape.opening())
            chunk = first
            while chunk is not None:
                count += 1
                self.metrics.tokens.labels(chunk.engine).inc()
                for event in shape.deltas(chunk):
                    yield sse_event(event)
                chunk = await anext(handle, None)
            if include_usage:
                yield sse_event(shape.usage_chunk(count))
            yield SSE_DONE
        except (KenshoError, ValueError) as exc:
            log.warning("stream ended by an error", error=str(exc), tokens=count)
            yield sse_event(error_body(_api_error(exc)))
            yield SSE_DONE
        except asyncio.CancelledError:
            if not _cancelled_by_server():
                raise  # the client went away, or the server is exiting
            # Cut off at the end of a drain: say so in the stream (the openai client
            # raises it as an APIError) rather than cutting the connection.
            log.warning("stream cut off at shutdown", tokens=count)
            err = shutting_down("this stream could not finish in time", code="shutdown")
            yield sse_event(error_body(err))
            yield SSE_DONE
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


def _api_error(exc: KenshoError | ValueError) -> APIError:
    """The HTTP error for a failed completion: a bad request is the client's (400)."""
    if isinstance(exc, ValueError) and not isinstance(exc, KenshoError):
        return APIError(400, str(exc))
    return error_for_exception(exc) or APIError(500, str(exc), type="server_error")


async def _first_chunk(handle: TaskHandle) -> GenerationChunk | None:
    return await anext(handle, None)


async def _all_chunks(handle: TaskHandle, first: GenerationChunk | None) -> list[GenerationChunk]:
    chunks = [first] if first is not None else []
    chunks += [chunk async for chunk in handle]
    return chunks


class OpenAIShaper:
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

    def deltas(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """The stream events for one engine chunk (one here; tools may need more)."""
        return [self.delta(chunk)]

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


Shaper = OpenAIShaper | ToolShaper


def _usage(completion_tokens: int) -> dict[str, int]:
    # Engines report generated tokens only; prompt tokens are not counted (0).
    return {
        "prompt_tokens": 0,
        "completion_tokens": completion_tokens,
        "total_tokens": completion_tokens,
    }
