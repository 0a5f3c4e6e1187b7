"""One runtime rig for the tests: mock engines, a runtime and an executor on one clock.

Every runtime test needs the same house: a GPU and a CPU mock on a
:class:`~kensho.runtime.clock.VirtualClock`, a :class:`RuntimeManager` over them that
records its status events, and (for the executor's tests) a :class:`TaskExecutor` on
top. Building it here keeps the tests about behaviour, and a change of a constructor
is one edit instead of one per test file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from kensho.events import BreakerStateChanged, Event
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines import (
    GenerationChunk,
    GenerationRequest,
    MockCPUEngine,
    MockGPUEngine,
)
from kensho.runtime.engines.base import Engine
from kensho.runtime.executor import Priority, TaskExecutor, TaskHandle
from kensho.runtime.manager import RuntimeManager

__all__ = ["ExecutorRig", "RuntimeRig"]

T = TypeVar("T")


class RuntimeRig:
    """A manager on virtual time with a GPU and a CPU mock, recording status events.

    ``clock``, ``gpu`` and ``cpu`` replace the defaults (a test that needs a breaker
    or an engine of its own builds it on the rig's clock first); ``fallback=False``
    leaves the CPU out of the runtime; other keywords go to :class:`RuntimeManager`.
    """

    def __init__(
        self,
        *,
        clock: VirtualClock | None = None,
        gpu: Engine | None = None,
        cpu: Engine | None = None,
        fallback: bool = True,
        cpu_continues: bool = True,
        **manager_kwargs: Any,
    ) -> None:
        self.clock = clock if clock is not None else VirtualClock()
        self.gpu: Any = gpu if gpu is not None else MockGPUEngine(clock=self.clock)
        self.cpu: Any = (
            cpu
            if cpu is not None
            else MockCPUEngine(clock=self.clock, supports_continuation=cpu_continues)
        )
        engines = (self.gpu, self.cpu) if fallback else (self.gpu,)
        self.runtime = RuntimeManager(*engines, clock=self.clock, **manager_kwargs)
        self.events: list[Event] = []
        self.runtime.add_listener(self.events.append)

    async def __aenter__(self) -> RuntimeRig:
        await self.runtime.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runtime.close()

    async def run(self, awaitable: Awaitable[T], step: float = 0.05, limit: float = 120) -> T:
        """Await ``awaitable`` while moving virtual time forward in small steps."""
        task = asyncio.ensure_future(awaitable)
        waited = 0.0
        while not task.done():
            assert waited < limit, "did not finish in virtual time"
            await self.clock.advance(step)
            waited += step
        return task.result()

    async def collect(self, request: GenerationRequest) -> list[GenerationChunk]:
        """Every chunk the runtime streams for ``request``, on virtual time."""

        async def go() -> list[GenerationChunk]:
            return [c async for c in self.runtime.generate(request)]

        return await self.run(go())

    async def text(self, prompt: str = "hello", max_tokens: int = 5) -> tuple[str, set[str]]:
        """The answer to ``prompt`` and the engines that produced it."""
        chunks = await self.collect(GenerationRequest(prompt=prompt, max_tokens=max_tokens))
        return "".join(c.text for c in chunks), {c.engine for c in chunks}

    def status(self) -> list[str]:
        """The messages users were shown (breaker transitions are operator detail)."""
        return [e.message for e in self.events if not isinstance(e, BreakerStateChanged)]


class ExecutorRig(RuntimeRig):
    """A :class:`RuntimeRig` with a :class:`TaskExecutor` on top (one slot per engine,
    ten queued tasks unless ``executor_kwargs`` say otherwise)."""

    def __init__(self, **executor_kwargs: Any) -> None:
        super().__init__()
        kwargs: dict[str, Any] = {"concurrency": {"gpu": 1, "cpu": 1}, "max_queue_size": 10}
        kwargs.update(executor_kwargs)
        self.executor = TaskExecutor(self.runtime, clock=self.clock, **kwargs)

    async def __aenter__(self) -> ExecutorRig:
        await self.runtime.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.executor.aclose()
        await self.runtime.close()

    def submit(
        self, priority: Priority = Priority.NORMAL, tokens: int = 5, **kw: Any
    ) -> TaskHandle:
        """Submit a ``tokens``-long generation at ``priority``."""
        return self.executor.submit(
            GenerationRequest(prompt="p", max_tokens=tokens), priority=priority, **kw
        )

    async def finish_all(self, limit: float = 600) -> None:
        """Move virtual time until nothing is queued or running."""
        waited = 0.0
        while self.executor.statistics().queued_total or self.executor.statistics().in_flight_total:
            assert waited < limit
            await self.clock.advance(0.5)
            waited += 0.5
