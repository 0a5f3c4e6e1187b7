"""How a source earns its place in a run: a minimum rate, abandonment, one first probe.

Three defences, each against one way a single bad source can stall a whole run
while a good one waits behind it:

- :class:`RateGuard`: a source that trickles (python-tuf's *slow retrieval* attack, a
  dying link) keeps every read under the read timeout and so is never timed out.
  Like curl's ``--speed-limit``/``--speed-time``, the guard measures the bytes a
  transfer delivers per ``window`` seconds of waiting on the source and gives up when
  the average falls below ``min_rate``. Windows are judged one by one, so a transfer
  that was fast at first cannot stall at the end on credit it earned early.
- :class:`Abandonment`: a source that failed in a way that says "not now" (it asked
  to be left alone with a long ``Retry-After``, it timed out, it crawled, it ran out
  of retries) would make every later file pay the same wait. Once abandoned, it is
  refused at once for the rest of the run, and the next source is asked instead.
- :class:`FirstAnswer`: until a source has answered once, at most one request goes
  to it at a time, so files repaired concurrently do not all pay for a dead server
  before the first of them finds out: they wait for that answer instead.

"A run" is the life of the source object: sources are made for one
``StorageManager`` (one ``kensho sync``, one ``kensho up`` boot) and closed with it.
An abandonment for a ``Retry-After`` ends earlier, when the server said it would be
back. All timing goes through an injectable :class:`MonotonicClock`, so tests run
on virtual time (``kensho.runtime.clock.VirtualClock`` is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kensho.errors import SourceError, TransferTooSlowError
from kensho.telemetry import get_logger

__all__ = [
    "SYSTEM_CLOCK",
    "Abandonment",
    "FirstAnswer",
    "MonotonicClock",
    "RateGuard",
    "TransferTooSlowError",
]

_log = get_logger("storage.source")


@runtime_checkable
class MonotonicClock(Protocol):
    """Where the sources read the time: monotonic seconds, only differences matter."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale."""
        ...


class _SystemClock:
    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SYSTEM_CLOCK"


#: The real clock (``time.monotonic``).
SYSTEM_CLOCK: MonotonicClock = _SystemClock()


class RateGuard:
    """The minimum transfer rate of one transfer, across all its retries.

    Only time spent waiting on the source counts: :meth:`start` when the body begins,
    :meth:`stop` when it ends, :meth:`paused` around work of our own (the sink
    hashing and writing). :meth:`feed` counts bytes and judges each full window;
    :meth:`check` judges without new bytes (after a read failed, so a source that
    sends a byte and then stalls past the read timeout cannot retry forever).
    ``min_rate <= 0`` disables the guard.
    """

    __slots__ = ("_bytes", "_clock", "_elapsed", "_since", "min_rate", "window")

    def __init__(self, min_rate: float, window: float, clock: MonotonicClock) -> None:
        if window <= 0:
            raise ValueError(f"the rate window must be positive, got {window}")
        self.min_rate = min_rate
        self.window = window
        self._clock = clock
        self._bytes = 0
        self._elapsed = 0.0
        self._since: float | None = None

    def start(self) -> None:
        """The source is being waited on from now."""
        if self._since is None:
            self._since = self._clock.monotonic()

    def stop(self) -> None:
        """The source is not being waited on any more (the body ended or broke)."""
        if self._since is not None:
            self._elapsed += self._clock.monotonic() - self._since
            self._since = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count the time of the block (our own work, not the source's)."""
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    def feed(self, received: int) -> None:
        """Count ``received`` bytes; raise :class:`TransferTooSlowError` if a window was slow."""
        self._bytes += received
        self.check()

    def check(self) -> None:
        """Judge the current window if it is full; start the next one if it passed."""
        if self.min_rate <= 0:
            return
        now = self._clock.monotonic()
        elapsed = self._elapsed + (now - self._since if self._since is not None else 0.0)
        if elapsed < self.window:
            return
        if self._bytes < self.min_rate * elapsed:
            raise TransferTooSlowError(self._bytes, elapsed, self.min_rate)
        self._bytes, self._elapsed = 0, 0.0
        if self._since is not None:
            self._since = now


@dataclass(frozen=True, slots=True)
class _Verdict:
    kind: type[SourceError]
    reason: str
    until: float


class Abandonment:
    """Whether a source was given up on for this run, and why.

    :meth:`abandon` records the failure and returns the error to raise for it;
    :meth:`check` raises, for every later request, an error of the same class (so a
    source that could not be reached still counts as unreachable for offline boot)
    saying it was skipped and why, without contacting the source.
    """

    __slots__ = ("_clock", "_name", "_verdict")

    def __init__(self, name: str, clock: MonotonicClock) -> None:
        self._name = name
        self._clock = clock
        self._verdict: _Verdict | None = None

    @property
    def reason(self) -> str | None:
        """Why the source is abandoned, or ``None`` while it is in the run."""
        verdict = self._verdict
        if verdict is None or self._clock.monotonic() >= verdict.until:
            return None
        return verdict.reason

    def abandon(self, error: SourceError, *, for_seconds: float = math.inf) -> SourceError:
        """Give the source up after ``error``; returns the error that says so."""
        reason = f"{error}; abandoned for the rest of this run"
        self._verdict = _Verdict(type(error), reason, self._clock.monotonic() + for_seconds)
        _log.warning("source abandoned for the rest of the run", source=self._name, error=reason)
        return type(error)(reason)

    def check(self) -> None:
        """Raise if the source is abandoned; return if it may be asked."""
        reason = self.reason
        if reason is not None:
            assert self._verdict is not None
            raise self._verdict.kind(f"skipped, not asked again: {reason}")


class FirstAnswer:
    """Until a source has answered once, let one request through at a time.

    :meth:`admit` returns ``True`` to the one caller that may contact the source
    now (the probe), which must call :meth:`done` when its request ends; the others
    wait until the source answered (then all go at once) or the probe ended without
    an answer (then the next one probes, after checking it was not abandoned).
    :meth:`answered` opens the way; :meth:`reset` closes it again (after an
    abandonment ended, the source must prove itself anew).
    """

    __slots__ = ("_answered", "_probe_ended", "_probing")

    def __init__(self) -> None:
        self._answered = False
        self._probing = False
        self._probe_ended = asyncio.Event()

    @property
    def is_open(self) -> bool:
        """Whether the source answered, so requests need not wait for each other."""
        return self._answered

    async def admit(self, abandonment: Abandonment) -> bool:
        """Wait for our turn; ``True`` if we are the probe. Raises if abandoned meanwhile."""
        while True:
            abandonment.check()
            if self._answered:
                return False
            if not self._probing:
                self._probing = True
                return True
            await self._probe_ended.wait()

    def answered(self) -> None:
        """The source answered (any HTTP status that is not a "come back later")."""
        self._answered = True
        self._wake()

    def done(self) -> None:
        """The probe's request ended, answered or not."""
        self._probing = False
        self._wake()

    def reset(self) -> None:
        """Make the next request probe again."""
        self._answered = False

    def _wake(self) -> None:
        self._probe_ended.set()
        self._probe_ended = asyncio.Event()  # the waiters hold the old one, now set
