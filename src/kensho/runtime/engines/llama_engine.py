"""LlamaCppEngine: GGUF models on llama.cpp, each engine in its own child process.

Why a process and not a thread: a CUDA error inside llama.cpp calls ``abort()``, which
no Python code can catch, and a ``Llama`` object is not thread-safe. So the model lives
in a child (``llama_child.py``) that this engine starts, feeds over a pipe and watches.
When the child dies (abort, out of memory, SIGKILL) the pipe closes: every request in
flight ends with :class:`~kensho.errors.EngineCrashedError`, which the breaker counts
and the fallback absorbs (before the first token the user sees nothing; after it, the
fallback continues the text). The next request — the breaker's probe — starts a new
child. The server itself never goes down with the model.

The hand-off is kept cheap: the event loop watches the pipe with ``add_reader`` and, at
each wake-up, drains every message that is ready, so a burst of tokens costs one
wake-up rather than one loop callback per token. Each token is its own chunk while
the consumer keeps up; tokens that queued up while it was away come as one chunk
(``GenerationChunk.tokens`` says how many). The child frames its messages itself
(:class:`~kensho.runtime.engines.llama_child.Channel`): per token it costs one
``poll(0)``, one ``pickle.dumps`` and one ``send``.

The child serves one request at a time, in arrival order; a cancelled request (the
consumer stopped reading) stops within one token, and a cancelled prompt stops during
its prefill (llama.cpp's abort callback).

It honours every OpenAI feature TorchEngine does (:data:`~kensho.runtime.engines.base.
FEATURES`), with the same meaning, so a mixed pair (torch and llama) fails over without
changing an answer's sense: the prompt's token count on the first chunk, logprobs of
the distribution each token was drawn from, logit bias and penalties counted over the
continuation too, and mean-pooled normalised embeddings (see ``llama_child.py``).
Structured output and tool calls use the torch engine's grammar
(:func:`~kensho.runtime.engines._constraints.grammar_for`): this side compiles the
request to its Lark text and checks its schemas (a keyword llguidance cannot enforce is
a 400 naming the field), the child masks each step with llguidance.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import signal
import subprocess
import sys
from array import array
from collections.abc import AsyncGenerator, AsyncIterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from kensho.errors import (
    EngineCrashedError,
    EngineError,
    EngineOutOfMemoryError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelFileError,
)
from kensho.runtime.engines._constraints import check_schemas, grammar_for
from kensho.runtime.engines.base import (
    FEATURES,
    EngineKind,
    Feature,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TokenLogprob,
)
from kensho.runtime.engines.llama_child import AbortFlags, Channel
from kensho.runtime.engines.structured import template_messages
from kensho.runtime.engines.torch_engine import StopMatcher
from kensho.telemetry import get_logger

__all__ = ["WINDOW", "LlamaCppEngine"]

log = get_logger("runtime.engine.llama")

_CHILD_SCRIPT = Path(__file__).with_name("llama_child.py")
_STDERR_TAIL = 2000  # bytes of the child's stderr kept for crash messages
_DEAD: tuple[str] = ("dead",)
_FINAL = frozenset({"end", "cancelled", "err", "dead"})
#: Tokens the child may decode ahead of the consumer; credit is returned in halves.
WINDOW = 32
_CHECKED_GRAMMARS = 64  # grammars whose schemas passed check_schemas (LRU)
_ids = itertools.count(1)


class _Stream:
    """Messages for one request, from the pipe reader to the request's consumer."""

    __slots__ = ("abandoned", "messages", "slot", "waiter")

    def __init__(self, slot: int) -> None:
        self.messages: collections.deque[tuple[Any, ...]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.abandoned = False
        self.slot = slot  # its AbortFlags slot, -1 for none

    def push(self, message: tuple[Any, ...]) -> None:
        self.messages.append(message)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> tuple[Any, ...]:
        while not self.messages:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.messages.popleft()


class _Child:
    """One running child process: its pipe, its requests, the tail of its stderr."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection, flags: AbortFlags) -> None:
        self.proc = proc
        self.conn = conn
        self.channel = Channel(conn)
        self.flags = flags
        self.free_slots = list(range(AbortFlags.SLOTS - 1, -1, -1))
        self.streams: dict[str, _Stream] = {}
        self.hello: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self.stderr = bytearray()
        self.alive = True
        self.info: dict[str, Any] = {}

    def stderr_tail(self) -> str:
        text = bytes(self.stderr[-_STDERR_TAIL:]).decode("utf-8", "replace").strip()
        return text.splitlines()[-1] if text else ""


class LlamaCppEngine:
    """A GGUF file served by llama.cpp (``llama-cpp-python``) in a child process.

    ``device="cuda"`` makes a GPU engine that offloads every layer (``n_gpu_layers``
    defaults to all) and whose ``load()`` raises a permanent
    :class:`EngineUnavailableError` when llama.cpp has no GPU support or sees no
    device, so the runtime starts on the fallback and says so once. ``n_ctx`` 0 means
    the model's own context; ``n_threads`` None lets llama.cpp choose.
    """

    supports_continuation = True
    features: frozenset[Feature] = FEATURES
    #: A ``Llama`` object serves one sequence at a time: the executor never gives this
    #: engine more than one slot, whatever ``[runtime] concurrency`` says, so queued
    #: requests wait in the executor's queue (priority, shedding, Retry-After) rather
    #: than inside the child where their first-token timeout would run out.
    max_concurrency = 1

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "cpu",
        name: str | None = None,
        n_ctx: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int | None = None,
    ) -> None:
        if n_ctx < 0 or n_batch < 1:
            raise ValueError(f"n_ctx must be >= 0 and n_batch >= 1, got {n_ctx}, {n_batch}")
        self.model_path = Path(model_path)
        self.device = device
        self.kind: EngineKind = "gpu" if device.startswith("cuda") else "cpu"
        self.name = name or self.kind
        self._options: dict[str, Any] = {
            "path": str(self.model_path),
            "n_ctx": n_ctx,
            "n_threads": n_threads,
            "n_batch": n_batch,
            "n_gpu_layers": (-1 if n_gpu_layers is None else n_gpu_layers)
            if self.kind == "gpu"
            else 0,
            "require_gpu": self.kind == "gpu",
        }
        self._child: _Child | None = None
        self._loading: asyncio.Task[None] | None = None
        self._checked: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.tokens_generated = 0
        self.prefills_aborted = 0
        self.processes_started = 0

    @property
    def loaded(self) -> bool:
        return self._child is not None and self._child.alive

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs (tests kill it to show failover)."""
        return self._child.proc.pid if self.loaded and self._child is not None else None

    @property
    def context_length(self) -> int:
        """The context the loaded model serves (0 before the first load)."""
        return int(self._child.info.get("n_ctx", 0)) if self._child is not None else 0

    # -- lifecycle -----------------------------------------------------------------------

    async def load(self) -> None:
        """Start the child and load the model in it; single-flight, cancellation-safe."""
        if self.loaded:
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._start())
        await asyncio.shield(self._loading)

    async def _start(self) -> None:
        old, self._child = self._child, None
        if old is not None:
            await self._reap(old)
        if not self.model_path.is_file():
            raise EngineUnavailableError(
                f"engine {self.name!r}: {self.model_path} does not exist; run `kensho verify` "
                "on the store, or point [model] gguf at the file"
            )
        proc, conn, flags = await asyncio.to_thread(self._spawn)
        child = _Child(proc, conn, flags)
        self._add_readers(child)
        self.processes_started += 1
        try:
            child.channel.send(("load", self._options))
            answer = await child.hello
        except BaseException:
            await self._reap(child)
            raise
        if answer[0] != "ready":
            await self._reap(child)
            raise await self._load_error(answer, child)
        child.info = dict(answer[1])
        self._child = child
        log.info(
            "engine loaded",
            engine=self.name,
            device=self.device,
            model=str(self.model_path),
            pid=child.proc.pid,
            n_ctx=child.info.get("n_ctx"),
            gpu_offload=child.info.get("gpu_offload"),
        )

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Connection, AbortFlags]:
        parent_end, child_end = Pipe(duplex=True)
        try:
            flags, flags_fd = AbortFlags.create()
        except OSError as exc:
            parent_end.close()
            child_end.close()
            raise EngineUnavailableError(
                f"engine {self.name!r}: cannot make its abort flags file: {exc}"
            ) from exc
        argv = [sys.executable, "-I", str(_CHILD_SCRIPT), str(child_end.fileno()), str(flags_fd)]
        try:
            proc = subprocess.Popen(  # noqa: S603 - our interpreter, our script
                argv,
                pass_fds=(child_end.fileno(), flags_fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            parent_end.close()
            raise EngineUnavailableError(
                f"engine {self.name!r}: cannot start its llama.cpp process: {exc}"
            ) from exc
        finally:
            child_end.close()
            os.close(flags_fd)  # the parent's map holds its own reference
        return proc, parent_end, flags

    def _add_readers(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(child.conn.fileno(), self._on_messages, child)
        assert child.proc.stderr is not None
        os.set_blocking(child.proc.stderr.fileno(), False)
        loop.add_reader(child.proc.stderr.fileno(), self._on_stderr, child)

    def _on_messages(self, child: _Child) -> None:
        """Drain every message that is ready: one event-loop wake-up for a burst."""
        try:
            messages = child.channel.take(block=False)
        except OSError:
            messages = None
        if messages is None:
            self._on_death(child)
            return
        for message in messages:
            self._dispatch(child, message)

    def _dispatch(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind in ("ready", "fail"):
            if not child.hello.done():
                child.hello.set_result(message)
            return
        stream = child.streams.get(message[1])
        if _is_final(message):
            if stream is not None:
                del child.streams[message[1]]
                if stream.slot >= 0:
                    child.free_slots.append(stream.slot)  # the child is done with it
            if kind == "end":
                self.tokens_generated += 1
            elif kind == "cancelled" and message[2]:
                self.prefills_aborted += 1
        if kind == "tok":
            self.tokens_generated += 1
        if stream is not None and not stream.abandoned:
            stream.push(message)

    def _on_stderr(self, child: _Child) -> None:
        assert child.proc.stderr is not None
        try:
            data = os.read(child.proc.stderr.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading(child, stderr_only=True)
            return
        child.stderr += data
        del child.stderr[: -_STDERR_TAIL * 2]

    def _on_death(self, child: _Child) -> None:
        if not child.alive:
            return
        child.alive = False
        self._stop_reading(child)
        if not child.hello.done():
            child.hello.set_result(_DEAD)
        for stream in child.streams.values():
            stream.push(_DEAD)
        child.streams.clear()
        log.warning("engine process died", engine=self.name, pid=child.proc.pid)

    def _stop_reading(self, child: _Child, *, stderr_only: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if child.proc.stderr is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(child.proc.stderr.fileno())
        if not stderr_only:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(child.conn.fileno())

    async def _reap(self, child: _Child) -> None:
        """Close the pipe (the child exits by itself), then make sure it is gone."""
        child.alive = False
        self._stop_reading(child)
        child.channel.close()
        child.conn.close()
        child.flags.close()
        try:
            await asyncio.to_thread(child.proc.wait, 5.0)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            await asyncio.to_thread(child.proc.wait)
        if child.proc.stderr is not None:
            child.proc.stderr.close()

    async def close(self) -> None:
        """Stop the child; ``load()`` may start a new one later."""
        child, self._child = self._child, None
        self._loading = None
        if child is not None:
            for stream in child.streams.values():
                stream.push(_DEAD)
            child.streams.clear()
            await self._reap(child)

    async def health(self) -> bool:
        return self.loaded

    # -- errors ----------------------------------------------------------------------------

    async def _load_error(self, answer: tuple[Any, ...], child: _Child) -> EngineError:
        where = f"engine {self.name!r}"
        if answer[0] == "dead":
            return await self._crash_error(child, "while loading " + str(self.model_path))
        kind, message = str(answer[1]), str(answer[2])
        if kind in ("format", "architecture", "context", "load"):
            return ModelFileError(f"{where}: cannot serve {message}", path=self.model_path)
        if kind == "memory":
            return EngineOutOfMemoryError(f"{where}: out of memory loading {message}")
        if kind in ("nogpu", "import"):
            hint = (
                "the CPU fallback will serve instead"
                if kind == "nogpu"
                else "install it with: pip install 'kensho[llama]'"
            )
            return EngineUnavailableError(f"{where}: {message}; {hint}", permanent=True)
        return EngineUnavailableError(f"{where}: {message}")

    async def _crash_error(self, child: _Child, during: str) -> EngineCrashedError:
        """The pipe closed: wait (briefly) for the exit status, to say how it died."""
        try:
            code: int | None = await asyncio.to_thread(child.proc.wait, 2.0)
        except subprocess.TimeoutExpired:
            code = None
        how = ""
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f" (killed by {signal.Signals(-code).name})"
        elif code is not None:
            how = f" (exit status {code})"
        tail = child.stderr_tail()
        said = f"; it said: {tail}" if tail else ""
        return EngineCrashedError(
            f"engine {self.name!r}: its llama.cpp process (pid {child.proc.pid}) died{how} "
            f"{during}{said}; a new process starts on the next request",
            exit_code=code,
        )

    # -- generation ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one chunk per token; a dead child is restarted here (the probe)."""
        if self._child is None or not self._child.alive:
            if self._child is None and self._loading is None:
                raise EngineUnavailableError(
                    f"engine {self.name!r} is not loaded; call load() before generate()"
                )
            await self.load()
        child = self._child
        assert child is not None
        params = _params(request, self._grammar(request))  # bad input raises here
        rid = f"{request.request_id}#{next(_ids)}"
        # No free slot (a thousand requests queued in one child): its prefill cannot
        # be cut short, the rest works the same.
        slot = child.free_slots.pop() if child.free_slots else -1
        if slot >= 0:
            child.flags.clear(slot)
        params["abort_slot"] = slot
        stream = _Stream(slot)
        child.streams[rid] = stream
        self._send(child, ("gen", rid, params))
        try:
            async with contextlib.aclosing(self._read(child, rid, stream, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            # Still listed: its last message has not come (a stop string, a consumer
            # that left), so the child is told to stop it.
            if child.alive and rid in child.streams:
                await self._cancel(child, rid, stream)

    async def _read(
        self, child: _Child, rid: str, stream: _Stream, request: GenerationRequest
    ) -> AsyncGenerator[GenerationChunk, None]:
        """The chunks of one request's messages; returns once its last message is read.

        One chunk per token while the consumer keeps up; the tokens that arrived while
        it was away (queued in ``stream``) come as one chunk.
        """
        stops = StopMatcher(request.stop)
        unreturned = 0  # tokens read whose credit the child has not been given back
        while True:
            message = await stream.get()
            kind = message[0]
            if kind in ("tok", "end"):
                batch = [message]
                queued = stream.messages
                while kind == "tok" and queued and queued[0][0] in ("tok", "end"):
                    message = queued.popleft()
                    kind = message[0]
                    batch.append(message)
                chunk = self._tokens(batch, stops)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                unreturned += chunk.tokens
                if unreturned >= WINDOW // 2:
                    self._send(child, ("credit", rid, unreturned))
                    unreturned = 0
            elif kind == "emb":
                yield self._vector(message)
                if message[5]:
                    return
            else:
                raise await self._stream_error(child, message, request)

    def _tokens(self, batch: list[tuple[Any, ...]], stops: StopMatcher) -> GenerationChunk:
        """``tok`` messages (maybe an ``end`` last) as one chunk, cut at a stop string."""
        texts: list[str] = []
        finish: FinishReason | None = None
        taken = 0
        for message in batch:
            taken += 1
            text, stopped = stops.feed(message[2])
            texts.append(text)
            if stopped:
                finish = "stop"
                break
            if message[0] == "end":
                texts.append(stops.flush())
                finish = message[6]
        used = batch[:taken]
        last = used[-1]
        return GenerationChunk(
            text="".join(texts),
            index=last[3],
            engine=self.name,
            finish_reason=finish,
            prompt_tokens=next((m[4] for m in used if m[4] is not None), None),
            logprobs=tuple(_token_logprob(m[5]) for m in used if m[5] is not None),
            tokens=taken,
        )

    def _grammar(self, request: GenerationRequest) -> str | None:
        """The Lark grammar the answer must follow (None: free), its schemas checked once
        (checking costs milliseconds; applications send the same schema again and again)."""
        grammar = grammar_for(request)
        if grammar is None:
            return None
        if grammar in self._checked:
            self._checked.move_to_end(grammar)
        else:
            check_schemas(request)
            self._checked[grammar] = None
            while len(self._checked) > _CHECKED_GRAMMARS:
                self._checked.popitem(last=False)
        return grammar

    def _send(self, child: _Child, message: tuple[Any, ...]) -> None:
        """A write to a child that just died is its death (the streams hear of it)."""
        try:
            child.channel.send(message)
        except OSError:
            self._on_death(child)

    async def _cancel(self, child: _Child, rid: str, stream: _Stream) -> None:
        """Tell the child to stop this request, and wait until it has (one token at most).

        The abort flag first: a prefill under way stops at its next graph node.
        """
        if stream.slot >= 0:
            child.flags.raise_flag(stream.slot)
        self._send(child, ("cancel", rid))
        try:
            while not _is_final(await stream.get()):
                pass
        except asyncio.CancelledError:
            stream.abandoned = True  # the child still ends it; nobody reads it now
            raise

    def _vector(self, message: tuple[Any, ...]) -> GenerationChunk:
        """An ``emb`` message: the vector of one input, float32 on the pipe."""
        return GenerationChunk(
            text="",
            index=message[2],
            engine=self.name,
            finish_reason="stop" if message[5] else None,
            prompt_tokens=message[3],
            embedding=tuple(array("f", message[4])),
        )

    async def _stream_error(
        self, child: _Child, message: tuple[Any, ...], request: GenerationRequest
    ) -> Exception:
        if message[0] == "dead":
            return await self._crash_error(child, f"during request {request.request_id}")
        if message[0] == "cancelled":
            return EngineError(f"engine {self.name!r}: request {request.request_id} was cancelled")
        kind, text = str(message[2]), str(message[3])
        if kind.startswith("invalid:"):
            return InvalidRequestError(text, code=kind.removeprefix("invalid:"), param=message[4])
        return EngineError(
            f"engine {self.name!r} failed during request {request.request_id}: {text}"
        )


def _is_final(message: tuple[Any, ...]) -> bool:
    """Whether ``message`` is the last one of its request (see ``llama_child.py``)."""
    return message[0] in _FINAL or (message[0] == "emb" and bool(message[5]))


def _token_logprob(entry: tuple[Any, ...]) -> TokenLogprob:
    """The child's ``(bytes, logprob, ((bytes, logprob), ...))`` as a TokenLogprob."""
    raw, logprob, top = entry
    return TokenLogprob(
        token=raw.decode("utf-8", "replace"),
        logprob=logprob,
        token_bytes=raw,
        top=tuple((b.decode("utf-8", "replace"), lp, b) for b, lp in top),
    )


def _params(request: GenerationRequest, grammar: str | None) -> dict[str, Any]:
    """What the child needs of a request (plain data: it crosses a pipe)."""
    pending = request.pending_embeddings if request.embed else ()
    return {
        "prompt": request.prompt,
        "messages": template_messages(request.messages),
        "tools": [tool.to_openai() for tool in request.tools] or None,
        "grammar": grammar,
        "grammar_param": "tools" if request.tools else "response_format",
        "embed": list(pending),
        "embed_first": len(request.embed) - len(pending),
        "continuation": request.continuation,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "window": WINDOW,
        "logprobs": request.logprobs,
        "top_logprobs": request.top_logprobs,
        "frequency_penalty": request.frequency_penalty,
        "presence_penalty": request.presence_penalty,
        "logit_bias": list(request.logit_bias),
    }
