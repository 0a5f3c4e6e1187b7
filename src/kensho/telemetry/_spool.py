"""A bounded folder of OTLP request bodies waiting for the collector to come back.

An offline device keeps logging; what it logged must reach the collector later, once,
and must never fill the disk or raise into the code that logged. So:

- each batch is one file holding the serialized OTLP request, written to a temporary
  name and renamed into place (``os.replace``): a file is either whole or absent, and
  a crash mid-write leaves only a ``.tmp`` file that the next process removes;
- names sort oldest first (``<time_ns>-<pid>-<seq>.<signal>.<records>``), so draining
  and eviction both follow arrival order, across processes;
- the folder holds at most ``max_bytes``: the oldest files are dropped to make room,
  and their records counted;
- a file is deleted only after the collector answered 2xx, and only one process
  drains at a time (a non-blocking file lock), so a batch is sent once;
- any ``OSError`` (full disk, read-only folder) drops the batch with a counter.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

import filelock

__all__ = ["Outcome", "Spool", "SpoolStats"]

_LOCK_NAME = ".drain.lock"
_TMP_SUFFIX = ".tmp"
_STALE_TMP_SECONDS = 60.0


class Outcome(Enum):
    """What became of one attempt to send a batch to the collector."""

    SENT = "sent"  # 2xx: delete it
    RETRY = "retry"  # unreachable, timed out, 429 or 5xx: keep it for later
    REJECTED = "rejected"  # any other answer: the collector will never take it


@dataclass
class SpoolStats:
    """Counters, in records (not files), since the spool was opened."""

    spooled: int = 0  # records written to the spool
    sent: int = 0  # spooled records the collector accepted
    evicted: int = 0  # oldest records dropped to stay under max_bytes
    failed: int = 0  # records that could not be written (full disk, no folder)
    rejected: int = 0  # spooled records the collector refused (4xx): dropped

    def __add__(self, other: SpoolStats) -> SpoolStats:
        return SpoolStats(
            *(getattr(self, f.name) + getattr(other, f.name) for f in fields(SpoolStats))
        )


@dataclass(frozen=True)
class _Entry:
    path: Path
    signal: str
    records: int
    size: int


def _is_batch_name(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 3 and parts[0][:1].isdigit() and parts[2].isdigit()


def _parse(path: Path) -> _Entry | None:
    """A spool file's signal and record count from its name; ``None`` if not ours."""
    if not _is_batch_name(path.name):
        return None
    parts = path.name.split(".")
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return _Entry(path, parts[1], int(parts[2]), size)


class Spool:
    """The spool folder for one process (several processes may share a folder)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.by_signal: dict[str, SpoolStats] = {}  # "logs", "traces": counted apart
        self._lock = threading.Lock()  # writes and evictions of this process
        self._seq = itertools.count()
        with contextlib.suppress(OSError):  # a missing folder is counted at put()
            directory.mkdir(parents=True, exist_ok=True)
        self._drain_lock = filelock.FileLock(str(directory / _LOCK_NAME), timeout=0)
        self._remove_stale_temporaries()

    @property
    def stats(self) -> SpoolStats:
        """The counters of every signal added up."""
        return sum(self.by_signal.values(), SpoolStats())

    def stats_for(self, signal: str) -> SpoolStats:
        """The counters of one signal (created at zero on first use)."""
        return self.by_signal.setdefault(signal, SpoolStats())

    def _remove_stale_temporaries(self) -> None:
        # A .tmp file a minute old is a write that a crash interrupted: never renamed,
        # never whole. Younger ones may be another live process's write in progress.
        stale = time.time() - _STALE_TMP_SECONDS
        with contextlib.suppress(OSError):
            for path in self.directory.glob(f"*{_TMP_SUFFIX}"):
                if path.stat().st_mtime < stale:
                    path.unlink(missing_ok=True)

    def entries(self) -> list[_Entry]:
        """The spooled batches, oldest first."""
        try:
            names = sorted(p for p in self.directory.iterdir() if not p.name.startswith("."))
        except OSError:
            return []
        return [e for e in map(_parse, names) if e is not None]

    def pending(self) -> bool:
        """Whether anything waits in the folder (from this process or an earlier one).

        Called for every batch, so it stops at the first spool file and stats nothing.
        """
        try:
            with os.scandir(self.directory) as it:
                return any(_is_batch_name(entry.name) for entry in it)
        except OSError:
            return False

    def put(self, signal: str, payload: bytes, records: int) -> bool:
        """Store one batch; ``False`` (and counted) when it cannot be kept."""
        stats = self.stats_for(signal)
        if len(payload) > self.max_bytes:
            stats.failed += records
            return False
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq):08d}.{signal}.{records}"
        tmp = self.directory / f"{os.getpid()}-{name}{_TMP_SUFFIX}"
        with self._lock:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._make_room(len(payload))
                with tmp.open("wb") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                tmp.replace(self.directory / name)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                stats.failed += records
                return False
        stats.spooled += records
        return True

    def _make_room(self, incoming: int) -> None:
        entries = self.entries()
        used = sum(e.size for e in entries)
        for entry in entries:
            if used + incoming <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another process sent it
                entry.path.unlink()
                self.stats_for(entry.signal).evicted += entry.records
            used -= entry.size

    def drain(self, send: Callable[[str, bytes], Outcome], deadline: float | None = None) -> bool:
        """Send spooled batches oldest first until one must wait; ``True`` if all went.

        Returns ``False`` at once when another process is draining (it will send them),
        when the collector asks to retry, or past ``deadline`` (``time.monotonic()``).
        """
        try:
            self._drain_lock.acquire()
        except (filelock.Timeout, OSError):
            return False
        try:
            for entry in self.entries():
                if deadline is not None and time.monotonic() > deadline:
                    return False
                if not self._send_one(entry, send):
                    return False
            return True
        finally:
            self._drain_lock.release()

    def _send_one(self, entry: _Entry, send: Callable[[str, bytes], Outcome]) -> bool:
        try:
            payload = entry.path.read_bytes()
        except FileNotFoundError:
            return True  # evicted meanwhile
        except OSError:
            return False
        outcome = send(entry.signal, payload)
        if outcome is Outcome.RETRY:
            return False
        with self._lock, contextlib.suppress(FileNotFoundError):
            entry.path.unlink()
        stats = self.stats_for(entry.signal)
        if outcome is Outcome.SENT:
            stats.sent += entry.records
        else:
            stats.rejected += entry.records
        return True
