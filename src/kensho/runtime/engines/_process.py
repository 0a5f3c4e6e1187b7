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

The protocol itself (what the messages mean) belongs to each engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

from kensho.errors import EngineCrashedError, EngineUnavailableError
from kensho.runtime.engines.llama_child import Channel
from kensho.telemetry import get_logger

__all__ = ["DEAD", "ChildProcess", "Stream"]

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

    @classmethod
    def spawn(
        cls,
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
