"""An engine's child process, seen from the server: spawn, pipe, watch, reap.

Both process-isolated engines (``LlamaCppEngine``, ``TorchProcessEngine``) keep their
model in a child process and talk to it over one duplex pipe of framed pickles
(:class:`~kensho.runtime.engines.llama_child.Channel`). What they share lives here:

- the event loop watches the pipe with ``add_reader`` and, at each wake-up, drains
  every message that is ready, so a burst of tokens costs one wake-up;
- each request's messages go to its own :class:`Stream`;
- the child's stderr is read as it comes, and its tail kept to say how it died;
- a closed pipe is the child's death: every stream in flight hears ``("dead",)`` and
  its request ends in :class:`~kensho.errors.EngineCrashedError`, which the breaker
  counts and the fallback absorbs; the engine starts a new child on its next request.

:class:`ChildEngine` is the engine side both build on: one child at a time, loaded
once (single-flight), restarted by the next request after it died (the breaker's
probe), each request a stream whose consumer may leave at any time (the child is then
told to stop, and the request ends when the child says it has). The protocol itself
(what the messages mean) belongs to each engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

from kensho.errors import EngineCrashedError, EngineError, EngineUnavailableError
from kensho.runtime.engines.base import GenerationChunk, GenerationRequest
from kensho.runtime.engines.llama_child import Channel
from kensho.telemetry import get_logger

__all__ = ["DEAD", "ChildEngine", "ChildProcess", "Credit", "Stream"]

log = get_logger("runtime.engine.process")

_STDERR_TAIL = 2000  # bytes of the child's stderr kept for crash messages
#: What every open stream hears when the child dies.
DEAD: tuple[str] = ("dead",)


class Stream:
    """Messages for one request, from the pipe reader to the request's consumer."""

    __slots__ = ("abandoned", "messages", "slot", "waiter")

    def __init__(self, slot: int = -1) -> None:
        self.messages: collections.deque[tuple[Any, ...]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.abandoned = False  # its consumer left: what still comes is dropped
        self.slot = slot  # an engine's per-request resource (llama: its abort flag)

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


class Credit:
    """What a request's consumer has read, given back to the child in halves of the window.

    The child runs at most ``window`` tokens ahead of its consumer (as in HTTP/2 flow
    control); returning credit per half window costs one small message per 16 tokens.
    """

    __slots__ = ("_child", "_half", "_rid", "_unreturned")

    def __init__(self, child: ChildProcess, rid: str, window: int) -> None:
        self._child = child
        self._rid = rid
        self._half = max(1, window // 2)
        self._unreturned = 0

    def read(self, tokens: int) -> None:
        self._unreturned += tokens
        if self._unreturned >= self._half:
            self._child.send(("credit", self._rid, self._unreturned))
            self._unreturned = 0


class ChildProcess:
    """One running child: its process, its pipe, its requests' streams, its stderr tail.

    ``dispatch`` is called on the event loop for every message but the load answer
    (the first ``ready`` or ``fail``, which resolves :attr:`hello`).
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        conn: Connection,
        *,
        engine: str,
        what: str,
        dispatch: Callable[[ChildProcess, tuple[Any, ...]], None],
    ) -> None:
        self.proc = proc
        self.conn = conn
        self.channel = Channel(conn)
        self.engine = engine
        self.what = what  # "llama.cpp process": how crash messages name it
        self.streams: dict[str, Stream] = {}
        self.hello: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self.stderr = bytearray()
        self.alive = True
        self.info: dict[str, Any] = {}
        self._dispatch = dispatch
        self._watch()

    @staticmethod
    def spawn(
        argv: Callable[[int], Sequence[str]],
        *,
        engine: str,
        what: str,
        pass_fds: Sequence[int] = (),
    ) -> tuple[subprocess.Popen[bytes], Connection]:
        """Start ``argv(child_fd)`` with one end of a new pipe; blocking (run it in a thread)."""
        parent_end, child_end = Pipe(duplex=True)
        try:
            proc = subprocess.Popen(  # noqa: S603 - our interpreter, our code
                list(argv(child_end.fileno())),
                pass_fds=(child_end.fileno(), *pass_fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            parent_end.close()
            raise EngineUnavailableError(
                f"engine {engine!r}: cannot start its {what}: {exc}"
            ) from exc
        finally:
            child_end.close()
        return proc, parent_end

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self) -> str:
        """The last line the child wrote to stderr (what it said before it died)."""
        text = bytes(self.stderr[-_STDERR_TAIL:]).decode("utf-8", "replace").strip()
        return text.splitlines()[-1] if text else ""

    # -- reading -------------------------------------------------------------------------

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._on_messages)
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        loop.add_reader(self.proc.stderr.fileno(), self._on_stderr)

    def _on_messages(self) -> None:
        """Drain every message that is ready: one event-loop wake-up for a burst."""
        try:
            messages = self.channel.take(block=False)
        except OSError:
            messages = None
        if messages is None:
            self.die()
            return
        for message in messages:
            if message[0] in ("ready", "fail") and not self.hello.done():
                self.hello.set_result(message)
            else:
                self._dispatch(self, message)

    def _on_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            data = os.read(self.proc.stderr.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading(stderr_only=True)
            return
        self.stderr += data
        del self.stderr[: -_STDERR_TAIL * 2]

    def _stop_reading(self, *, stderr_only: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if self.proc.stderr is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.proc.stderr.fileno())
        if not stderr_only:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.conn.fileno())

    # -- writing, death, reaping ---------------------------------------------------------

    def send(self, message: tuple[Any, ...]) -> None:
        """A write to a child that just died is its death (the streams hear of it)."""
        try:
            self.channel.send(message)
        except OSError:
            self.die()

    def die(self) -> None:
        """The pipe closed: every request in flight hears it."""
        if not self.alive:
            return
        self.alive = False
        self._stop_reading()
        if not self.hello.done():
            self.hello.set_result(DEAD)
        self._end_streams()
        log.warning("engine process died", engine=self.engine, pid=self.proc.pid)

    def _end_streams(self) -> None:
        for stream in self.streams.values():
            stream.push(DEAD)
        self.streams.clear()

    async def reap(self) -> None:
        """Close the pipe (the child exits by itself), then make sure it is gone."""
        self.alive = False
        self._stop_reading()
        self._end_streams()
        self.channel.close()
        self.conn.close()
        try:
            await asyncio.to_thread(self.proc.wait, 5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    async def crash_error(self, during: str) -> EngineCrashedError:
        """The pipe closed: wait (briefly) for the exit status, to say how it died."""
        try:
            code: int | None = await asyncio.to_thread(self.proc.wait, 2.0)
        except subprocess.TimeoutExpired:
            code = None
        how = ""
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f" (killed by {signal.Signals(-code).name})"
        elif code is not None:
            how = f" (exit status {code})"
        tail = self.stderr_tail()
        said = f"; it said: {tail}" if tail else ""
        return EngineCrashedError(
            f"engine {self.engine!r}: its {self.what} (pid {self.proc.pid}) died{how} "
            f"{during}{said}; a new process starts on the next request",
            exit_code=code,
        )


C = TypeVar("C", bound=ChildProcess)
_ids = itertools.count(1)


class ChildEngine(Generic[C]):
    """The engine side of a child process: load, restart after a death, stream, cancel.

    A subclass says how to start its child (:meth:`_start`, which ends with
    :meth:`_hello` and gives :meth:`_dispatch` to the child as its reader), what a
    request's first message is (:meth:`_open`), how its messages become chunks
    (:meth:`_read`), which message ends a request (:meth:`_is_final`) and what it
    counts (:meth:`_observe`).
    """

    name: str

    def __init__(self) -> None:
        self._child: C | None = None
        self._loading: asyncio.Task[None] | None = None
        self.tokens_generated = 0
        self.processes_started = 0

    @property
    def loaded(self) -> bool:
        return self._child is not None and self._child.alive

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs (tests kill it to show failover)."""
        return self._child.pid if self.loaded and self._child is not None else None

    # -- lifecycle -----------------------------------------------------------------------

    async def load(self) -> None:
        """Start the child and load the model in it; single-flight, cancellation-safe."""
        if self.loaded:
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._restart())
        await asyncio.shield(self._loading)

    async def _restart(self) -> None:
        old, self._child = self._child, None
        if old is not None:
            await old.reap()
        await self._start()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _hello(self, child: C, options: dict[str, Any]) -> dict[str, Any]:
        """Ask ``child`` to load; once it is ready it serves (its info is returned)."""
        self.processes_started += 1
        try:
            child.send(("load", options))
            answer = await child.hello
        except BaseException:
            await child.reap()
            raise
        if answer[0] != "ready":
            error = await self._load_error(answer, child)
            await child.reap()
            raise error
        child.info = dict(answer[1])
        self._child = child
        return child.info

    async def _load_error(self, answer: tuple[Any, ...], child: C) -> EngineError:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop the child (requests in flight end); ``load()`` may start a new one later."""
        child, self._child = self._child, None
        self._loading = None
        if child is not None:
            await child.reap()

    async def health(self) -> bool:
        return self.loaded

    # -- requests ------------------------------------------------------------------------

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
        rid = f"{request.request_id}#{next(_ids)}"
        stream, message = self._open(child, rid, request)  # bad input raises here
        child.streams[rid] = stream
        child.send(message)
        try:
            async with contextlib.aclosing(self._read(child, rid, stream, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            # Still listed: its last message has not come (a stop string, a consumer
            # that left), so the child is told to stop it.
            if child.alive and rid in child.streams:
                await self._cancel(child, rid, stream)

    def _open(
        self, child: C, rid: str, request: GenerationRequest
    ) -> tuple[Stream, tuple[Any, ...]]:
        raise NotImplementedError

    def _read(
        self, child: C, rid: str, stream: Stream, request: GenerationRequest
    ) -> AsyncGenerator[GenerationChunk, None]:
        raise NotImplementedError

    @staticmethod
    def _is_final(message: tuple[Any, ...]) -> bool:
        raise NotImplementedError

    def _dispatch(self, child: ChildProcess, message: tuple[Any, ...]) -> None:
        """A message from ``child``, to its request's stream (the pipe reader calls it).

        A request's last message takes its stream off the child's list; one whose
        consumer left is dropped.
        """
        stream = child.streams.get(message[1])
        final = self._is_final(message)
        if final and stream is not None:
            del child.streams[message[1]]
        self._observe(child, message, stream, final)
        if stream is not None and not stream.abandoned:
            stream.push(message)

    def _observe(
        self, child: ChildProcess, message: tuple[Any, ...], stream: Stream | None, final: bool
    ) -> None:
        """Counters and per-request resources, for every message (``stream``: None once
        its request ended)."""

    def _before_cancel(self, child: C, stream: Stream) -> None:
        """Called just before a cancel is sent (llama raises the prefill's abort flag)."""

    async def _cancel(self, child: C, rid: str, stream: Stream) -> None:
        """Tell the child to stop this request, and wait until it has (one token at most)."""
        self._before_cancel(child, stream)
        child.send(("cancel", rid))
        try:
            while not self._is_final(await stream.get()):
                pass
        except asyncio.CancelledError:
            stream.abandoned = True  # the child still ends it; nobody reads it now
            raise
