"""Over-the-air updates of a running store: poll, stage, apply (docs/releases.md).

:class:`ReleaseUpdater` ties the steps together for ``kensho up``: at start and then
every ``storage.update_interval`` seconds (jittered by ±25 %, so a fleet booted at
the same minute does not poll in step), it checks the release channels
(:mod:`.channel`); a newer trusted release is staged in the background
(:mod:`.prefetch`); once staged, ``storage.auto_apply`` hands it to the ``apply``
callback (the kernel's live apply); otherwise it waits for the next boot, a
``kensho sync`` or ``POST /v1/kensho/update``.

:class:`ReleaseStatus` folds the release events into what the status snapshot,
``/metrics`` and ``kensho status`` show; it reads nothing but events, so it cannot
drift from what the log and the status stream said.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable

from kensho.errors import KenshoError
from kensho.events import (
    Event,
    ReleaseApplied,
    ReleaseApplyFailed,
    ReleaseChecked,
    ReleasePrefetchProgress,
    ReleaseSnapshot,
    ReleaseStaged,
)
from kensho.storage.channel import ChannelResult, ReleaseChannel
from kensho.storage.manager import StorageManager
from kensho.storage.prefetch import Prefetcher, RateLimiter, Staging
from kensho.telemetry import get_logger

__all__ = ["JITTER", "ReleaseStatus", "ReleaseUpdater"]

_log = get_logger("storage.release")

#: The poll interval varies by this fraction either way.
JITTER = 0.25


class ReleaseStatus:
    """The device's release state, kept up to date from release events."""

    def __init__(self, *, current_serial: int | None, auto_apply: bool = False) -> None:
        self._state = ReleaseSnapshot(current_serial=current_serial, auto_apply=auto_apply)

    def snapshot(self) -> ReleaseSnapshot:
        return self._state

    def seed_staged(self, serial: int | None, *, complete: bool) -> None:
        """What a boot finds in the staging folder (a run before this one staged it)."""
        if serial is not None:
            self._replace(staged_serial=serial, staged_complete=complete)

    def observe(self, event: Event) -> None:
        """A hub listener: fold one event in (others are ignored)."""
        if isinstance(event, ReleaseChecked):
            self._replace(
                last_check_at=event.ts,
                last_check_result=event.result,
                last_check_detail=event.detail,
            )
        elif isinstance(event, ReleasePrefetchProgress):
            self._replace(
                staged_serial=event.serial,
                staged_done=event.done,
                staged_total=event.total,
                staged_complete=False,
            )
        elif isinstance(event, ReleaseStaged):
            done = self._state.staged_total if self._state.staged_serial == event.serial else 0
            self._replace(staged_serial=event.serial, staged_complete=True, staged_done=done)
        elif isinstance(event, ReleaseApplied):
            self._replace(
                current_serial=event.serial,
                staged_serial=None,
                staged_done=0,
                staged_total=0,
                staged_complete=False,
            )
        elif isinstance(event, ReleaseApplyFailed) and event.serial is not None:
            self._replace(current_serial=event.serial)  # rolled back (or never switched)

    def _replace(self, **changes: object) -> None:
        self._state = dataclasses.replace(self._state, **changes)  # type: ignore[arg-type]


class ReleaseUpdater:
    """Polls, stages and (with ``auto_apply``) applies releases for one store.

    ``sleep`` and ``jitter`` (a number in [0, 1)) are injectable: a test drives the
    polling on virtual time. ``apply`` is awaited once a release is staged when
    ``auto_apply`` is on.
    """

    def __init__(
        self,
        manager: StorageManager,
        *,
        interval: float,
        emit: Callable[[Event], None],
        rate: int = 0,
        auto_apply: bool = False,
        apply: Callable[[], Awaitable[object]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.manager = manager
        self.interval = interval
        self.auto_apply = auto_apply
        self.apply = apply
        self.sleep = sleep
        self.jitter = jitter
        self.channel = ReleaseChannel(manager.sources, manager._trust, emit)
        self.prefetcher = Prefetcher(manager, emit=emit, rate=rate, limiter=limiter)
        self._busy = asyncio.Lock()

    @property
    def staging(self) -> Staging:
        return self.prefetcher.staging

    def next_delay(self) -> float:
        """Seconds to the next poll: the interval, ±:data:`JITTER`."""
        return self.interval * (1 - JITTER + 2 * JITTER * self.jitter())

    async def check_now(self) -> ChannelResult:
        """One poll; stage a newer trusted release; apply it live if so configured.

        One at a time: a poll asked for while another runs waits for it.
        """
        async with self._busy:
            result = await self.channel.check()
            if result.result != "new" or result.manifest is None:
                return result
            staged = await self.prefetcher.stage(result.manifest)
            if staged.outcome == "staged" and self.auto_apply and self.apply is not None:
                await self.apply()
            return result

    async def run(self) -> None:
        """Poll at once, then every :meth:`next_delay` seconds, until cancelled.

        A failed poll is logged and the loop goes on: the channel is retried at the
        next interval, and the store keeps serving what it has.
        """
        while True:
            try:
                await self.check_now()
            except (KenshoError, OSError) as exc:
                _log.warning("release check failed; retried at the next interval", error=str(exc))
            await self.sleep(self.next_delay())
