"""Applying a staged release to a running service: swap files, reload engines.

The storage side (:func:`kensho.storage.prefetch.apply_staged`) swaps the staged
files in atomically, one ``os.replace`` each, as any update does; a file already
open by an engine keeps its old inode until the engine reopens it. Then the engines
reload one at a time behind their breakers, so no request fails:

1. the primary's breaker is forced open: new requests go to the fallback; requests
   already streaming on the primary finish there (the executor's in-flight count for
   it is awaited); then the primary closes and loads the new files, and its breaker
   is reset;
2. the same for the fallback, with the primary serving.

A breaker that was not closed before (a primary already failing) is left to its own
probes: the apply does not hide a fault it did not cause.

If an engine fails to load the new files, the previous files, kept by the storage
side until the new release has served, are put back
(:func:`kensho.storage.prefetch.restore_previous`), the engine is loaded again on
them, and the failure is reported (:class:`~kensho.events.ReleaseApplyFailed`).

At boot (:meth:`LiveApplier.start_runtime`) the same rule holds for a release
applied offline before the engines started: while the previous files are kept the
trusted release is on trial, and engines that cannot load it (none loads, or one
fails for a reason other than a missing device) get the previous release back, are
started again on it, and the release is never staged again. A run killed between
the apply and the engines' load leaves the release on trial for the next boot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kensho.errors import EngineError, KenshoError
from kensho.events import BreakerStateChanged, Event, ReleaseApplyFailed
from kensho.hub import EventHub
from kensho.runtime.breaker import BreakerState, CircuitBreaker
from kensho.runtime.engines.base import Engine
from kensho.runtime.executor import TaskExecutor
from kensho.runtime.manager import RuntimeManager
from kensho.storage import StorageManager
from kensho.storage.manifest import Manifest
from kensho.storage.prefetch import (
    apply_staged,
    forget_previous,
    previous_kept,
    restore_previous,
)
from kensho.telemetry import get_logger

__all__ = ["LiveApplier"]

log = get_logger("kernel")


@dataclass
class LiveApplier:
    """Applies the staged release of ``storage`` to a service running on ``runtime``.

    ``drain_timeout``: how long an engine's in-flight streams may take to finish
    before it reloads anyway (``server.shutdown_timeout``).
    """

    storage: StorageManager
    runtime: Callable[[], RuntimeManager | None]
    executor: Callable[[], TaskExecutor | None]
    hub: EventHub
    drain_timeout: float = 10.0

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()

    async def apply(self, *, how: str) -> Manifest | None:
        """Apply the staged release now; ``None`` when nothing newer is staged.

        Raises (after reporting) when the store refuses it, or when an engine could
        not load it (the previous release then serves again).
        """
        async with self._lock:
            previous = await self.storage.trusted_manifest()
            applied = await apply_staged(self.storage, how=how, emit=self.hub.emit, keep=True)
            if applied is None:
                return None
            closed = self._closed_breakers()
            try:
                await self.reload_engines(closed)
            except EngineError as exc:
                await self._roll_back(applied, previous, exc, closed)
                raise
            await asyncio.to_thread(forget_previous, self.storage.state)
            return applied

    def _pairs(self) -> list[tuple[Engine, CircuitBreaker]]:
        runtime = self.runtime()
        if runtime is None:
            return []
        pairs: list[tuple[Engine, CircuitBreaker]] = [(runtime.primary, runtime.primary_breaker)]
        if runtime.fallback is not None and runtime.fallback_breaker is not None:
            pairs.append((runtime.fallback, runtime.fallback_breaker))
        return pairs

    def _closed_breakers(self) -> set[str]:
        """The engines whose breaker is closed before the apply: only those are forced
        open for their reload and reset after it."""
        return {e.name for e, b in self._pairs() if b.state == BreakerState.CLOSED}

    async def reload_engines(self, closed: set[str]) -> None:
        """Reload the primary, then the fallback, each while the other serves.

        An engine that fails to load raises, its breaker left open (traffic stays
        on the other engine until the rollback reloads it).
        """
        for engine, breaker in self._pairs():
            await self._reload(engine, breaker, closed=engine.name in closed)

    async def _reload(self, engine: Engine, breaker: CircuitBreaker, *, closed: bool) -> None:
        if closed and breaker.state == BreakerState.CLOSED:
            breaker.force_open(f"{engine.name} reloading a new release")
        await self._idle(engine.name)
        log.info("engine reloading", engine=engine.name)
        await engine.close()
        try:
            await engine.load()
        except EngineError as exc:
            if closed:
                raise
            # It was not serving before (no device, already failing): its failure says
            # nothing about the release, and its breaker keeps handling it.
            log.warning("engine still unavailable", engine=engine.name, error=str(exc))
            return
        if closed:
            breaker.reset(f"{engine.name} reloaded on the new release")

    async def _idle(self, name: str) -> None:
        """Wait until no task runs on engine ``name`` (at most ``drain_timeout``)."""
        executor = self.executor()
        running = executor.running_on(name) if executor is not None else []
        if running:
            await asyncio.wait(running, timeout=self.drain_timeout)

    async def start_runtime(self, make: Callable[[], RuntimeManager]) -> RuntimeManager:
        """Start the engines of a fresh ``make()``; roll back a release on trial that
        they cannot load, then start fresh engines on the previous one.

        Raises what :meth:`RuntimeManager.start` raises when no release is on trial,
        or when the engines cannot load the previous release either.
        """
        trial = await asyncio.to_thread(previous_kept, self.storage.state)
        runtime = make()
        with self._start_failures() as failures:
            try:
                await runtime.start()
            except EngineError as exc:
                if not trial:
                    raise
                failures[:] = [str(exc)]
        if not trial:
            return runtime
        if not failures:
            await asyncio.to_thread(forget_previous, self.storage.state)
            return runtime
        await runtime.close()
        on_trial = await self.storage.trusted_manifest()
        target = on_trial.serial if on_trial is not None else 0
        previous = await self._restore(target, "; ".join(failures), stays_on=target)
        runtime = make()
        await runtime.start()
        log.info("engines started on the previous release", serial=previous)
        return runtime

    @contextmanager
    def _start_failures(self) -> Iterator[list[str]]:
        """The reasons of the engines that failed to load while the block ran (their
        breaker tripped open); a missing device forces it open instead: not the
        release's fault, so not counted."""
        failures: list[str] = []

        def listen(event: Event) -> None:
            if isinstance(event, BreakerStateChanged) and event.to_state == "open":
                failures.append(event.reason)

        self.hub.add_listener(listen)
        try:
            yield failures
        finally:
            self.hub.remove_listener(listen)

    async def _roll_back(
        self, applied: Manifest, previous: Manifest | None, exc: EngineError, closed: set[str]
    ) -> None:
        await self._restore(
            applied.serial,
            str(exc),
            stays_on=previous.serial if previous is not None else None,
            then=lambda: self.reload_engines(closed),
        )

    async def _restore(
        self,
        target: int,
        why: str,
        *,
        stays_on: int | None,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> int | None:
        """Put the previous release back (then ``then()``) and report it: the serial
        served now (``stays_on`` if putting it back failed)."""
        reason = f"an engine could not load release {target}: {why}"
        log.error("release rolled back", serial=target, reason=reason)
        serial = stays_on
        try:
            serial = (await restore_previous(self.storage)).serial
            if then is not None:
                await then()
        except (KenshoError, OSError) as again:
            reason += f"; rolling back failed too: {again}"
        self.hub.emit(ReleaseApplyFailed(target_serial=target, serial=serial, reason=reason))
        return serial
