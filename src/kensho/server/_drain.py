"""Graceful shutdown of the HTTP server: refuse what has not started, finish what has.

A shutdown goes through three phases (Envoy's drain; vLLM and Triton answer 503 while
stopping):

1. **open** — requests are served.
2. **draining** (:meth:`Drain.begin`, the first SIGINT or SIGTERM) — the server keeps
   listening, but every new request gets a 503 with ``Retry-After``, so a client or a
   load balancer goes elsewhere at once instead of finding a closed port or waiting.
   Requests still waiting for their first token (queued in the executor, or not yet
   streaming) are cancelled and answered the same 503. Streams, and whole answers
   already producing tokens, go on.
3. **cut off** (:meth:`Drain.cut_off`: ``server.shutdown_timeout`` passed, or a second
   signal) — what still runs is cancelled by the server itself: a stream ends with a
   final SSE error event and ``data: [DONE]``, a whole answer with a 503. Never a cut
   connection or a 500, which is what cancelling the request tasks from outside (as
   uvicorn does at its own graceful timeout) gives.

The completion routes register each task handle (:meth:`admit`, :meth:`producing`,
:meth:`release`) and the server's outermost middleware counts requests in progress
(:meth:`request`), so :meth:`finish` knows when the drain is over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from kensho.runtime.clock import AsyncioClock, Clock, timeout
from kensho.runtime.executor import TaskHandle
from kensho.server._errors import APIError
from kensho.telemetry import get_logger

__all__ = ["DRAIN_RETRY_AFTER", "Drain", "shutting_down"]

log = get_logger("server")

#: Refusals while shutting down say when to come back.
DRAIN_RETRY_AFTER = 5.0


def shutting_down(why: str, *, code: str = "draining") -> APIError:
    """The 503 of a shutdown, with ``Retry-After``: the guard and the completions share it."""
    return APIError(
        503,
        f"the server is shutting down: {why}; retry on another instance or after it restarts",
        type="server_error",
        code=code,
        retry_after=DRAIN_RETRY_AFTER,
    )


class Drain:
    """The server's shutdown state, shared by the HTTP layer and the kernel.

    ``clock`` times :meth:`finish` (virtual time in tests).
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self.draining = False
        self.cut = False
        #: Set at :meth:`begin`: long-lived streams (status events) end on it.
        self.stopping = asyncio.Event()
        self._waiting: set[TaskHandle] = set()
        self._producing: set[TaskHandle] = set()
        self._requests = 0
        self._waiters: list[asyncio.Future[None]] = []

    # -- what the HTTP layer reports ----------------------------------------------------

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count one HTTP request in progress for the duration of the block."""
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1
            if self._requests == 0:
                self._notify()

    def admit(self, handle: TaskHandle) -> None:
        """A task was submitted for a request: it waits for its first token."""
        self._waiting.add(handle)

    def producing(self, handle: TaskHandle) -> None:
        """The task produced its first token: it now runs until done or cut off."""
        self._waiting.discard(handle)
        self._producing.add(handle)

    def release(self, handle: TaskHandle) -> None:
        """The request's response is over (whatever happened to the task)."""
        self._waiting.discard(handle)
        self._producing.discard(handle)

    # -- what the kernel drives ---------------------------------------------------------

    def begin(self) -> None:
        """Refuse new work and cancel the tasks that have not started answering."""
        if self.draining:
            return
        self.draining = True
        self.stopping.set()
        refused = _cancel_all(self._waiting, "the server is shutting down")
        log.info(
            "shutdown requested: draining",
            refused=refused,
            in_flight=len(self._producing),
            requests=self._requests,
        )

    def cut_off(self, why: str) -> None:
        """End what still runs now: streams get a final error event, others a 503."""
        self.begin()
        if not self.cut:
            self.cut = True
            log.warning(
                f"{why}: ending the responses still running",
                in_flight=len(self._producing),
                requests=self._requests,
            )
        _cancel_all(self._waiting | self._producing, "the server shut down before it finished")
        self._notify()

    async def finish(self, seconds: float, *, grace: float) -> bool:
        """Drain: wait up to ``seconds`` for the requests in progress, then cut off.

        ``grace`` bounds the wait for the cut-off responses to write their last
        event. True when nothing had to be cut off (a clean drain).
        """
        self.begin()
        if await self._wait(seconds) and not self.cut:
            log.info("drain finished: every response completed")
            return True
        self.cut_off(f"drain not finished after {seconds:g} s (server.shutdown_timeout)")
        await self._wait(grace, after_cut=True)  # the cut-off responses write their end
        return False

    async def _wait(self, seconds: float, *, after_cut: bool = False) -> bool:
        """Wait until no request is in progress or (unless ``after_cut``) the drain is
        cut; True when idle."""
        try:
            async with timeout(self.clock, seconds):
                while self._requests and (after_cut or not self.cut):
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            pass
        return self._requests == 0

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _cancel_all(handles: set[TaskHandle], reason: str) -> int:
    """Cancel every handle (its consumer sees the cancellation); how many were live."""
    return sum(handle.cancel(reason) for handle in list(handles))
