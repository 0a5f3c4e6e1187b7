"""The verified chunks of a store, found by SHA-256: what a store serves to its peers.

A chunk is on the shelf when the file holding it passed its last check: the file is
listed by the store's trusted manifest, its record in ``state.db`` says it matched
that manifest's SHA-256, and its ``stat`` still equals that record (the fast-verify
rule of :mod:`.state`). The index is rebuilt whenever the trusted manifest or the
state database changes, so a sync, an update or a failed verify in another process
is seen at the next request.

Reads re-check the stat and never follow a symlink out of the root. The bytes are
also hashed as they are read (:class:`ChunkReader`): a file changed without changing
its stat (bit rot, a raw write) is caught before the chunk's last piece is sent, so
a peer never completes a wrong chunk, and the file leaves the shelf.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from kensho.errors import KenshoError
from kensho.storage._fs import resolve_inside
from kensho.storage.manifest import parse_manifest
from kensho.storage.state import StateStore, StatRecord
from kensho.telemetry import get_logger

__all__ = ["ChunkReader", "ChunkShelf", "ShelvedChunk"]

_log = get_logger("storage.share")
_READ = 1 << 20


@dataclass(frozen=True, slots=True)
class ShelvedChunk:
    """Where one verified chunk lies: a file of the store, an offset, a size."""

    sha256: str
    path: str
    offset: int
    size: int
    record: StatRecord


class ChunkShelf:
    """The verified chunks of the store at ``root``, by SHA-256. Thread-safe, blocking."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._state = StateStore(self.root)
        self._lock = threading.Lock()
        self._stamp: tuple[object, ...] | None = None
        self._chunks: dict[str, ShelvedChunk] = {}
        self._spoiled: set[tuple[str, StatRecord]] = set()

    def close(self) -> None:
        self._state.close()

    def __len__(self) -> int:
        self._refresh()
        return len(self._chunks)

    def find(self, sha256: str) -> ShelvedChunk | None:
        """The chunk with this hash, if a file that passed its last check holds it now."""
        self._refresh()
        chunk = self._chunks.get(sha256)
        if chunk is None or (chunk.path, chunk.record) in self._spoiled:
            return None
        try:
            current = StatRecord.of(resolve_inside(self.root, chunk.path).lstat())
        except (OSError, KenshoError):
            return None
        return chunk if current == chunk.record else None

    def open(self, chunk: ShelvedChunk) -> ChunkReader | None:
        """A reader for ``chunk``, or ``None`` if its file changed or went away."""
        try:
            path = resolve_inside(self.root, chunk.path)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except (OSError, KenshoError):
            return None
        if StatRecord.of(os.fstat(fd)) != chunk.record:
            os.close(fd)
            return None
        return ChunkReader(self, chunk, fd)

    def spoil(self, chunk: ShelvedChunk) -> None:
        """Take ``chunk``'s file off the shelf until it is verified again."""
        with self._lock:
            self._spoiled.add((chunk.path, chunk.record))
        _log.warning(
            "a shared file no longer matches its last check; not serving it",
            path=chunk.path,
            chunk=chunk.sha256,
        )

    def _current_stamp(self) -> tuple[object, ...]:
        """What changes whenever the index may have to: the manifest and the database."""
        parts: list[object] = []
        for path in (
            self._state.manifest_path,
            self._state.dir / "state.db",
            self._state.dir / "state.db-wal",
        ):
            try:
                st = path.stat()
            except OSError:
                parts.append(None)
            else:
                parts.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(parts)

    def _refresh(self) -> None:
        stamp = self._current_stamp()
        with self._lock:
            if stamp == self._stamp:
                return
            self._chunks = self._index()
            self._stamp = stamp

    def _index(self) -> dict[str, ShelvedChunk]:
        try:
            data = self._state.load_trusted_manifest()
            if data is None:
                return {}
            manifest = parse_manifest(data)
            records = self._state.records()
        except (OSError, KenshoError) as exc:
            _log.warning("cannot read the store to share", root=str(self.root), error=str(exc))
            return {}
        chunks: dict[str, ShelvedChunk] = {}
        for entry in manifest.files:
            sha, record = records.get(entry.path, (None, None))
            if sha != entry.sha256 or record is None:
                continue  # not checked against this release, or found bad
            for c in entry.chunks:
                chunks.setdefault(
                    c.sha256, ShelvedChunk(c.sha256, entry.path, c.offset, c.size, record)
                )
        return chunks


class ChunkReader:
    """Reads one shelved chunk piece by piece, hashing as it goes (blocking calls).

    :meth:`read` returns the next piece of the requested range, or ``b""`` at its
    end. The range's last piece is only returned once the whole chunk matched its
    hash (the rest of the chunk is hashed too, not sent); a mismatch raises
    ``ValueError`` and spoils the file on the shelf.
    """

    def __init__(self, shelf: ChunkShelf, chunk: ShelvedChunk, fd: int) -> None:
        self._shelf = shelf
        self.chunk = chunk
        self._fd = fd
        self._digest = hashlib.sha256()
        self._hashed = 0  # chunk bytes hashed so far
        self._start = 0
        self._end = chunk.size

    def select(self, start: int, end: int) -> None:
        """Send bytes ``start`` to ``end`` (exclusive) of the chunk instead of all of it."""
        self._start, self._end = start, end

    def read(self) -> bytes:
        chunk = self.chunk
        while self._hashed < self._start:  # bytes before the range: hashed, not sent
            self._next(min(_READ, self._start - self._hashed))
        if self._hashed >= self._end:
            return b""
        piece = self._next(min(_READ, self._end - self._hashed))
        if self._hashed == self._end:
            while self._hashed < chunk.size:  # the rest: hashed, so the check is whole
                self._next(min(_READ, chunk.size - self._hashed))
            if self._digest.hexdigest() != chunk.sha256:
                self._shelf.spoil(chunk)
                raise ValueError(f"{chunk.path} no longer holds chunk {chunk.sha256}")
        return piece

    def _next(self, want: int) -> bytes:
        data = os.pread(self._fd, want, self.chunk.offset + self._hashed)
        if len(data) != want:
            self._shelf.spoil(self.chunk)
            raise ValueError(f"{self.chunk.path} ended inside chunk {self.chunk.sha256}")
        self._digest.update(data)
        self._hashed += len(data)
        return data

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:  # a response dropped before its body started
        self.close()
