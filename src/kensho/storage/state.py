"""The store's memory, under ``<root>/.kensho/``: what was verified, what is trusted.

``state.db`` (SQLite, WAL) holds one record per file whose every chunk was hashed
and matched: the SHA-256 it matched and its ``(size, mtime_ns, inode, ctime_ns)``
right then. A later fast verify trusts a file whose stat still equals its record and
whose expected hash is unchanged. ``ctime_ns`` is in the key because it cannot be set
from user space: ``touch -d`` or a restore tool can fake mtime, not ctime.

``trusted-manifest.json`` is the last manifest under which every required file was
good; with no manifest given and no network, Kensho boots from it (offline-first).
``trusted-keys.json`` pins the signing keys and threshold the store trusts (see
``docs/signing.md``, "Pinned keys").

Everything here lives inside the root: a ``.kensho`` (or ``.kensho/tmp``) that is a
symlink leading elsewhere is refused before anything is read or written through it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kensho.storage._fs import PathGuard, atomic_write_bytes
from kensho.telemetry import get_logger

__all__ = ["STATE_DIR", "StatRecord", "StateStore"]

STATE_DIR = ".kensho"
_log = get_logger("storage")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS verified (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    verified_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class StatRecord:
    """The parts of ``os.stat`` that change whenever a file's content may have."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> StatRecord:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class StateStore:
    """SQLite state of one store root. Thread-safe; every call is short and blocking."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / STATE_DIR
        self.tmp_dir = self.dir / "tmp"
        self.manifest_path = self.dir / "trusted-manifest.json"
        self.pending_path = self.dir / "pending-manifest.json"
        self.keys_path = self.dir / "trusted-keys.json"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def check_dir(self) -> None:
        """Refuse a state folder that leads outside the root (``UnsafePathError``).

        Why: the lock, ``state.db``, the partial downloads and the trusted manifest
        would otherwise be read and written wherever a planted ``.kensho`` symlink
        points. :meth:`PathGuard.check` vets the folders above a path, so checking a
        name inside the tmp folder covers ``.kensho`` and ``.kensho/tmp``.
        """
        PathGuard(self.root).check(self.tmp_dir.relative_to(self.root).as_posix() + "/x")

    def ensure_dir(self) -> None:
        """:meth:`check_dir`, then create the state folder if it is missing."""
        self.check_dir()
        self.dir.mkdir(parents=True, exist_ok=True)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.ensure_dir()
            db = sqlite3.connect(self.dir / "state.db", timeout=30, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def records(self) -> dict[str, tuple[str, StatRecord]]:
        """Every verified record: path -> (sha256, stat). Empty if none was ever kept.

        The records are a cache: an unreadable database (read-only medium, disk
        error, garbage) means "no records", so every file gets hashed, never a crash.
        """
        self.check_dir()
        if self._db is None and not (self.dir / "state.db").exists():
            return {}
        try:
            with self._lock:
                rows = self._conn().execute(
                    "SELECT path, sha256, size, mtime_ns, inode, ctime_ns FROM verified"
                )
                return {r[0]: (r[1], StatRecord(r[2], r[3], r[4], r[5])) for r in rows}
        except (sqlite3.Error, OSError) as exc:
            _log.warning("state database unreadable; hashing every file", error=str(exc))
            return {}

    def put(self, items: Iterable[tuple[str, str, StatRecord]]) -> None:
        """Record files as verified against ``sha256`` with the given stat."""
        now = time.time()
        rows = [(p, h, s.size, s.mtime_ns, s.inode, s.ctime_ns, now) for p, h, s in items]
        if rows:
            self._write("INSERT OR REPLACE INTO verified VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def forget(self, paths: Iterable[str]) -> None:
        """Drop the records of files found bad (a fast path must not vouch for them)."""
        rows = [(p,) for p in paths]
        if rows and (self._db is not None or (self.dir / "state.db").exists()):
            self._write("DELETE FROM verified WHERE path = ?", rows)

    def _write(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        try:
            with self._lock, self._conn() as db:
                db.executemany(sql, rows)
        except (sqlite3.Error, OSError) as exc:
            # Losing a cache entry costs a re-hash later; failing the verify costs more.
            _log.warning("cannot update the state database", path=str(self.dir), error=str(exc))

    def _load(self, path: Path) -> bytes | None:
        self.check_dir()
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes()
        return None

    def _save(self, path: Path, data: bytes) -> None:
        self.ensure_dir()
        atomic_write_bytes(path, data, tmp_dir=self.dir)

    def load_trusted_manifest(self) -> bytes | None:
        """The last trusted manifest's bytes, or ``None``."""
        return self._load(self.manifest_path)

    def save_trusted_manifest(self, data: bytes) -> None:
        """Keep ``data`` as the trusted manifest (atomic, durable)."""
        self._save(self.manifest_path, data)

    def load_pinned_keys(self) -> bytes | None:
        """The pinned trusted keys (``TrustedKeys.dump`` bytes), or ``None``."""
        return self._load(self.keys_path)

    def save_pinned_keys(self, data: bytes) -> None:
        """Pin ``data`` as the store's trusted keys (atomic, durable)."""
        self._save(self.keys_path, data)

    # An update swaps files one by one. Its manifest is journaled first, so that a run
    # killed among the swaps is finished by the next boot, even offline, instead of
    # leaving a store that matches neither release.

    def load_pending_manifest(self) -> bytes | None:
        """The manifest of an update that started swapping files, or ``None``."""
        return self._load(self.pending_path)

    def save_pending_manifest(self, data: bytes) -> None:
        self._save(self.pending_path, data)

    def has_pending_manifest(self) -> bool:
        self.check_dir()
        return self.pending_path.exists()

    def clear_pending_manifest(self) -> None:
        self.check_dir()
        with contextlib.suppress(FileNotFoundError):
            self.pending_path.unlink()
