"""The OpenAI routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``
(and ``/v1/embeddings``, from ``_embeddings.py``).

Each body first passes the field audit (``_fields.py``): a field the engines cannot
honour is a 400 naming it, never silently dropped.

Every completion goes through the :class:`~kensho.runtime.executor.TaskExecutor`
(priority from ``X-Kensho-Priority``, deadline from ``X-Kensho-Timeout``), so overload
is answered early and explicitly (429 with ``Retry-After``) instead of by a request
that hangs. :class:`CompletionRunner` waits for the first token *before* the response
starts, so queue-phase failures still get their proper status code (429, 503, 504)
rather than a 200 with an error inside; a client that goes away (seen by the request's
:class:`~kensho.server._sse.ClientWatch`) cancels its task and frees its slot; at a
drain's cut-off a stream ends with an error event, a whole answer with a 503.
:class:`OpenAIShaper` builds the OpenAI response objects.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.routing import Match, Route
from starlette.types import Scope

from kensho.errors import KenshoError, QueueFullError
from kensho.runtime.engines.base import (
    Feature,
    GenerationChunk,
    GenerationRequest,
    common_features,
)
from kensho.runtime.executor import Priority, TaskHandle
from kensho.server._context import ServerContext
from kensho.server._drain import shutting_down
from kensho.server._errors import APIError, error_body, error_for_exception, invalid_body
from kensho.server._fields import audit_chat, audit_completion
from kensho.server._logprobs import TextOffsets, chat_logprobs, text_logprobs
from kensho.server._metrics import ServerMetrics
from kensho.server._schemas import ChatCompletionRequest, CompletionRequest
from kensho.server._sse import (
    SSE_DONE,
    SSE_HEADERS,
    ClientGoneError,
    ClientWatch,
    EventStream,
    sse_event,
)
from kensho.server._tools import ToolShaper, chat_messages, structured_options
from kensho.telemetry import bound_context, get_logger

__all__ = [
    "PRIORITY_HEADER",
    "TIMEOUT_HEADER",
    "CompletionRunner",
    "OpenAIShaper",
    "add_openai_routes",
    "check_model",
    "parse_body",
    "served_features",
    "usage",
]

log = get_logger("server")

PRIORITY_HEADER = "x-kensho-priority"
TIMEOUT_HEADER = "x-kensho-timeout"
_Body = TypeVar("_Body", bound=BaseModel)
_P = TypeVar("_P")


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


def _cancelled_by_server() -> bool:
    """True when a caught ``CancelledError`` came from the task handle, not this task.

    The executor reports a task it cancelled (shutdown, drain cut-off) by raising
    ``CancelledError`` from the handle; a cancellation of the request's own task
    (client gone, server exit) is pending on the current task instead.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def served_features(ctx: ServerContext) -> frozenset[Feature]:
    """What every engine that may serve a request honours (it may fail over)."""
    return common_features((ctx.runtime.primary, ctx.runtime.fallback))


def check_model(ctx: ServerContext, model: str) -> None:
    """404 (OpenAI's body and code) for a model id this server does not serve: checked
    before the field audit, since no field means anything for a model not here."""
    if model != ctx.model_id:
        raise APIError(
            404,
            f"model {model!r} does not exist here; this server serves "
            f"{ctx.model_id!r} (see GET /v1/models)",
            code="model_not_found",
            param="model",
        )


def add_openai_routes(app: FastAPI, ctx: ServerContext, metrics: ServerMetrics) -> None:
    """The OpenAI routes; each completion turns its body into a ``GenerationRequest``."""
    from kensho.server._embeddings import add_embedding_route  # it builds on this module

    runner = CompletionRunner(ctx, metrics)

    def model_card() -> dict[str, Any]:
        return {"id": ctx.model_id, "object": "model", "created": 0, "owned_by": "kensho"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(ctx, model_id)
        return model_card()

    add_embedding_route(app, ctx, runner)

    async def chat(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        check_model(ctx, body.model)
        audit_chat(body, served_features(ctx))
        gen = GenerationRequest(
            messages=chat_messages(body),
            max_tokens=body.max_completion_tokens or body.max_tokens or ctx.default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logit_bias=body.logit_bias_pairs(),
            **structured_options(body, ctx.runtime),
        )
        return await runner.complete("chat", body, gen, request)

    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        check_model(ctx, body.model)
        audit_completion(body, served_features(ctx))
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
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logit_bias=body.logit_bias_pairs(),
        )
        return await runner.complete("text", body, gen, request)

    # Matched first, and served by Starlette without FastAPI's per-request machinery
    # (dependency solving, a second JSON pass, exit stacks): on the path of every
    # token's first byte, that machinery cost more than the rest of the route.
    app.router.routes[:0] = [
        _HotRoute("/v1/chat/completions", chat),
        _HotRoute("/v1/completions", completions),
    ]


class _HotRoute(Route):
    """A plain Starlette ``POST`` route that names itself in the scope (as FastAPI's do)
    for the request metrics, which are labelled by route."""

    def __init__(self, path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        super().__init__(path, endpoint, methods=["POST"], include_in_schema=False)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child


async def parse_body(request: Request, model: type[_Body]) -> _Body:
    """The request's JSON body as ``model``, parsed and validated in one pass; a 400
    naming the first bad field (or saying it is not JSON) otherwise."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid_body(exc.errors(include_url=False)) from None


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
        timing = _Timing("chat" if kind == "chat" else "completions", time.perf_counter())
        watch = ClientWatch(request.receive)
        handed_over = False  # to the streamed response, which closes the watch
        with bound_context(request_id=gen.request_id):
            try:
                prepare = functools.partial(_prepare_answer, kind, body, gen)
                handle, first, answer = await self._start(
                    timing, body.model, gen, request, watch, meanwhile=prepare
                )
                if body.stream:
                    stream = self._stream_answer(handle, first, answer, timing)
                    handed_over = True
                    return EventStream(stream, watch, headers=SSE_HEADERS)
                chunks = await self._finish(timing, handle, first, watch)
            except ClientGoneError:
                return Response(status_code=499)
            finally:
                if not handed_over:
                    watch.close()
            return JSONResponse(answer.shape.whole(chunks))

    async def run_whole(
        self, endpoint: str, model: str, gen: GenerationRequest, request: Request
    ) -> list[GenerationChunk] | None:
        """Every chunk of ``gen`` run through the executor like a completion (priority,
        deadline, drain, breakers); ``None`` when the client went away first."""
        timing = _Timing(endpoint, time.perf_counter())
        watch = ClientWatch(request.receive)
        with bound_context(request_id=gen.request_id):
            try:
                handle, first, _ = await self._start(
                    timing, model, gen, request, watch, meanwhile=_nothing
                )
                return await self._finish(timing, handle, first, watch)
            except ClientGoneError:
                return None
            finally:
                watch.close()

    async def _start(
        self,
        timing: _Timing,
        model: str,
        gen: GenerationRequest,
        request: Request,
        watch: ClientWatch,
        *,
        meanwhile: Callable[[], _P],
    ) -> tuple[TaskHandle, GenerationChunk | None, _P]:
        """Admit ``gen`` and wait for its first chunk (raises ``ClientGoneError``);
        ``meanwhile()`` runs while the engine reads the prompt (:meth:`_first_token`)."""
        ctx = self.ctx
        check_model(ctx, model)
        if ctx.draining:
            raise shutting_down("new requests are refused")
        priority = _priority(request)
        deadline = _timeout(request, ctx.request_timeout)
        try:
            handle = ctx.executor.submit(gen, priority=priority, deadline=deadline)
        except QueueFullError as exc:
            raise self._refuse(exc) from None
        ctx.drain.admit(handle)
        first, prepared = await self._first_token(handle, watch, meanwhile)
        self.metrics.ttft.labels(timing.endpoint).observe(time.perf_counter() - timing.started)
        return handle, first, prepared

    async def _finish(
        self,
        timing: _Timing,
        handle: TaskHandle,
        first: GenerationChunk | None,
        watch: ClientWatch,
    ) -> list[GenerationChunk]:
        """The rest of a whole answer; the task is released whatever happens."""
        try:
            chunks = await self._whole_answer(handle, first, watch)
        finally:
            self.ctx.drain.release(handle)
            await handle.aclose()
        for chunk in chunks:
            if chunk.embedding is None:
                self.metrics.tokens.labels(chunk.engine).inc(chunk.tokens)
        self.metrics.latency.labels(timing.endpoint).observe(time.perf_counter() - timing.started)
        return chunks

    async def _first_token(
        self, handle: TaskHandle, watch: ClientWatch, meanwhile: Callable[[], _P]
    ) -> tuple[GenerationChunk | None, _P]:
        """The first chunk, before the response starts: failures keep their status.

        Awaited in the request's own task (no task of its own: the first token is
        handed straight to the response). The yield first lets the executor's runner
        task (created by ``submit``) hand the request to the engine; ``meanwhile``
        then prepares what does not depend on the token while the engine reads the
        prompt, so that after the token only the token's own event is left to build.
        """
        try:
            await asyncio.sleep(0)
            prepared = meanwhile()
            first = await watch.until_gone(anext(handle, None))
        except BaseException as exc:
            self.ctx.drain.release(handle)
            await handle.aclose()
            err = self._not_started(exc)
            if err is exc:
                raise
            raise err from None
        self.ctx.drain.producing(handle)  # released when its response ends
        return first, prepared

    def _not_started(self, exc: BaseException) -> BaseException:
        """What to raise for a task that failed before its first token."""
        if isinstance(exc, asyncio.CancelledError) and _cancelled_by_server():
            # A drain refusing work that has not started, or the executor closing.
            return self._refuse(shutting_down("this request had not started and was dropped"))
        if isinstance(exc, (KenshoError, ValueError)):
            return self._refuse(exc)
        return exc

    async def _whole_answer(
        self, handle: TaskHandle, first: GenerationChunk | None, watch: ClientWatch
    ) -> list[GenerationChunk]:
        """Every chunk of a whole (non-streamed) answer."""
        try:
            return await watch.until_gone(_all_chunks(handle, first))
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
        answer: _Answer,
        timing: _Timing,
    ) -> AsyncGenerator[bytes, None]:
        """The stream's events; the opening one goes out with the first token's, in one
        write (one segment for the client to read before it sees the first token)."""
        shape, include_usage = answer.shape, answer.include_usage
        count = 0
        pending = answer.opening
        try:
            chunk = first
            while chunk is not None:
                count += chunk.tokens
                self.metrics.tokens.labels(chunk.engine).inc(chunk.tokens)
                shape.count(chunk)
                for event in shape.deltas(chunk):
                    pending += sse_event({**event, "usage": None} if include_usage else event)
                yield pending
                pending = b""
                chunk = await anext(handle, None)
            if pending:  # no token at all
                yield pending
            if include_usage:
                yield sse_event(shape.usage_chunk(count, shape.prompt_tokens))
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
class _Answer:
    """What an answer needs before its first token: its shaper and, for a stream, the
    encoded opening event and whether usage comes at the end."""

    shape: Shaper
    opening: bytes = b""
    include_usage: bool = False


def _prepare_answer(
    kind: Literal["chat", "text"],
    body: ChatCompletionRequest | CompletionRequest,
    gen: GenerationRequest,
) -> _Answer:
    echo = gen.prompt if isinstance(body, CompletionRequest) and body.echo else None
    plain = OpenAIShaper(kind, body.model, logprobs=gen.logprobs, echo=echo)
    calling = bool(gen.tools) and gen.tool_choice != "none"
    shape: Shaper = ToolShaper(plain) if calling else plain
    if not body.stream:
        return _Answer(shape)
    opening = shape.opening()
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return _Answer(shape, sse_event({**opening, "usage": None} if usage else opening), usage)


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class _Timing:
    endpoint: str
    started: float


def _api_error(exc: KenshoError | ValueError) -> APIError:
    """The HTTP error for a failed completion: a bad request is the client's (400)."""
    if isinstance(exc, ValueError) and not isinstance(exc, KenshoError):
        return APIError(400, str(exc))
    return error_for_exception(exc) or APIError(500, str(exc), type="server_error")


async def _all_chunks(handle: TaskHandle, first: GenerationChunk | None) -> list[GenerationChunk]:
    chunks = [first] if first is not None else []
    chunks += [chunk async for chunk in handle]
    return chunks


class OpenAIShaper:
    """Builds OpenAI response objects for one request (chat or text completion)."""

    def __init__(
        self,
        kind: Literal["chat", "text"],
        model: str,
        *,
        logprobs: bool = False,
        echo: str | None = None,
    ) -> None:
        self.kind = kind
        self.model = model
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.logprobs = logprobs
        self.echo = echo  # a completion's prompt, returned before its text
        self.prompt_tokens = 0
        self._offsets = TextOffsets(len(echo) if echo else 0)

    def count(self, chunk: GenerationChunk) -> None:
        """Note the prompt's size: the first engine to report it is the one that read
        the whole prompt (a fallback continuing a stream reports a longer one)."""
        if chunk.prompt_tokens is not None and not self.prompt_tokens:
            self.prompt_tokens = chunk.prompt_tokens

    def _logprobs(self, chunks: list[GenerationChunk]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        entries = [e for c in chunks for e in c.logprobs]
        if self.kind == "chat":
            return chat_logprobs(entries)
        return text_logprobs(entries, self._offsets)

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
        choice = {"index": 0, "text": self.echo or "", "logprobs": None, "finish_reason": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def delta(self, chunk: GenerationChunk) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {
                "index": 0,
                "delta": {"content": chunk.text},
                "finish_reason": chunk.finish_reason,
            }
            choice["logprobs"] = self._logprobs([chunk]) if chunk.logprobs else None
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {
            "index": 0,
            "text": chunk.text,
            "logprobs": self._logprobs([chunk]) if chunk.logprobs else None,
            "finish_reason": chunk.finish_reason,
        }
        return {**self._base("text_completion"), "choices": [choice]}

    def deltas(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """The stream events for one engine chunk (one here; tools may need more)."""
        return [self.delta(chunk)]

    def usage_chunk(self, tokens: int, prompt_tokens: int = 0) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage(prompt_tokens, tokens)}

    def whole(self, chunks: list[GenerationChunk]) -> dict[str, Any]:
        for chunk in chunks:
            self.count(chunk)
        text = "".join(c.text for c in chunks)
        finish = chunks[-1].finish_reason if chunks else "stop"
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish or "stop",
            }
            choice["logprobs"] = self._logprobs(chunks)
            base = self._base("chat.completion")
        else:
            choice = {
                "index": 0,
                "text": (self.echo or "") + text,
                "logprobs": self._logprobs(chunks),
                "finish_reason": finish or "stop",
            }
            base = self._base("text_completion")
        tokens = sum(c.tokens for c in chunks)
        return {**base, "choices": [choice], "usage": usage(self.prompt_tokens, tokens)}


Shaper = OpenAIShaper | ToolShaper


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage``: the prompt in the model's tokens, as its engine counted it."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
