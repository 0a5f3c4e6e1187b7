"""Writing chunks into a partial file: the one write path of :mod:`._assemble`.

Fetched bytes go through :class:`ChunkWriter` (written and hashed chunk by chunk on
a writer thread, each verified chunk fed on to the file's :class:`WholeDigest`, and
handed to the kernel for write-back at once); local chunks are copied by
:func:`copy_same_offset` (repair: the current file, same offsets) or
:func:`copy_from_donors` (update: any local file holding the same bytes), each
re-hashed before it is written. Every write ends in a :class:`PartWriter`, and so does
every swap of a built file into place: it is the build layer's declared seam, so a
writer that fails (a full disk, a crash between two swaps) reaches every way a byte can
enter the store, for repair and update alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from kensho.errors import DownloadError, UnsafePathError
from kensho.storage._fs import FOLDER_SYNC, PathGuard, start_writeback
from kensho.storage.hashing import (
    BATCH_BYTES,
    BUFFER_SIZE,
    chunks_within,
    mismatches_in,
    read_into,
    thread_buffer,
)
from kensho.storage.manifest import Chunk
from kensho.storage.state import StatRecord

__all__ = [
    "ChunkMismatch",
    "ChunkWriter",
    "Donor",
    "LocalCopy",
    "PartWriter",
    "WholeDigest",
    "consecutive_runs",
    "copy_from_donors",
    "copy_same_offset",
    "donor_copy",
    "same_offset_copy",
]

_FLUSH = 1 << 20
_IN_FLIGHT = 8  # queued write jobs per transfer, at most _FLUSH bytes each (or a chunk)
#: The bytes of a chunk not yet verified are kept (as views of what was received) up
#: to this size, to feed the whole-file digest once the chunk matches; the bytes of a
#: larger chunk are read back from the file instead.
_HOLD = 16 << 20


class ChunkMismatch(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(f"chunk {index} does not match its hash")
        self.index = index


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class PartWriter:
    """Every write of the build layer into a partial file, and every swap into place.

    The seam of :mod:`._assemble`: a :class:`~._assemble.FileAssembler` (and so a
    ``StorageManager``, its ``part_writer``) hands its writer to each job that
    writes: chunks fetched from a source, chunks copied from local files, the final
    swap. A subclass that raises (``ENOSPC`` from :meth:`write`, a crash from
    :meth:`place`) is how tests, or a fault-injection run, reach all of them at once.
    Methods run on worker threads, concurrently for different files.
    """

    def write(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` of the partial file ``fd``."""
        _pwrite_all(fd, data, offset)

    def write_pieces(self, fd: int, pieces: list[bytes], offset: int) -> None:
        """Write ``pieces`` one after the other from ``offset`` (vectored: no join)."""
        if not hasattr(os, "pwritev"):  # pragma: no cover - not Linux or BSD
            self.write(fd, b"".join(pieces), offset)
            return
        for start in range(0, len(pieces), 512):  # stay below IOV_MAX
            batch = pieces[start : start + 512]
            want = sum(map(len, batch))
            written = os.pwritev(fd, batch, offset)
            if written < want:  # short write: finish the rest piece by piece
                self.write(fd, b"".join(batch)[written:], offset + written)
            offset += want

    def place(self, part: Path, dest: Path) -> StatRecord:
        """Move a built (fsynced) partial file over ``dest``, fsync the folder; the
        new file's record.

        The folder fsync is shared with the renames done in the same folder before it
        started (:class:`~._fs.FolderSync`): this rename is durable when it returns.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        part.replace(dest)
        FOLDER_SYNC.sync(dest.parent)
        return StatRecord.of(dest.lstat())


class WholeDigest:
    """The SHA-256 of a whole file, computed in file order while the file is built.

    Why: checking the built file against the manifest's ``sha256`` used to read it
    all back after writing it (a second pass over the disk or the page cache, one
    more second per GB). Instead the writer thread feeds this digest the fetched
    bytes it has just written, as soon as their chunks matched, so the check costs
    nothing at the end of a sequential download.

    Only *final* bytes are ever hashed: bytes of chunks that matched (fetched and
    verified, resumed, or copied from a local file). A gap in what was fed (a chunk
    fetched later, by another source) holds the digest at its start; once the gap's
    chunks are final they are read back from the file (:meth:`catch_up`), so the
    result is always the hash of the bytes on disk, in order, whatever the mix of
    local and fetched chunks. Used by one thread at a time (the writer thread while
    fetching, then one pool thread for :meth:`hexdigest`).
    """

    def __init__(self, fd: int, chunks: Sequence[Chunk], final: Iterable[int]) -> None:
        self.fd = fd
        self.chunks = chunks
        self.size = chunks[-1].end if chunks else 0
        self.pos = 0  # bytes [0, pos) are hashed
        self._digest = hashlib.sha256()
        self._final = bytearray(len(chunks))  # 1: the chunk's bytes in the file are good
        for i in final:
            self._final[i] = 1

    @property
    def complete(self) -> bool:
        """Whether every byte is hashed: :meth:`hexdigest` then reads nothing."""
        return self.pos == self.size

    def add(self, verified: range, start: int, views: Sequence[memoryview]) -> None:
        """Chunks ``verified`` matched; ``views`` hold their bytes from ``start`` on.

        ``views`` run to the end of the last chunk of ``verified``; they may begin
        after its first byte (``start``: bytes before it were not kept), the file
        supplies the rest.
        """
        self._final[verified.start : verified.stop] = b"\x01" * len(verified)
        if start > self.pos:
            self.catch_up(start)
        if start != self.pos:  # a gap of chunks still to fetch: read back once final
            return
        for view in views:
            self._digest.update(view)
            self.pos += len(view)
        self.catch_up()

    def catch_up(self, limit: int | None = None) -> None:
        """Hash from the file the final bytes after ``pos`` (up to ``limit``).

        Reads as far as the chunks from ``pos`` on are final, one contiguous stretch
        at a time: the cost follows the bytes, not the number of chunks.
        """
        chunks = self.chunks
        first = chunks_within(chunks, self.pos)
        if first >= len(chunks):
            return
        stop = self._final.find(0, first)
        end = self.size if stop == -1 else chunks[stop].offset
        if stop == first:
            return
        end = end if limit is None else min(end, limit)
        buf = thread_buffer()
        while self.pos < end:
            want = min(BUFFER_SIZE, end - self.pos)
            got = read_into(self.fd, buf[:want], self.pos)
            if got < want:
                raise OSError(f"the partial file ended at byte {self.pos + got} of {self.size}")
            self._digest.update(buf[:got])
            self.pos += got

    def hexdigest(self) -> str | None:
        """The whole file's SHA-256; ``None`` if some chunk is not final yet."""
        self.catch_up()
        return self._digest.hexdigest() if self.pos == self.size else None


class _RunHasher:
    """Checks the bytes of one run of consecutive chunks, chunk by chunk, as they come.

    Lives on the writer thread: its jobs run one after the other, in order, so the
    running digest needs no lock, and the event loop never touches a chunk boundary.
    The bytes of each chunk that matched go on to the file's :class:`WholeDigest`.
    """

    def __init__(self, chunks: Sequence[Chunk], run: range, whole: WholeDigest) -> None:
        self.chunks = chunks
        self.index = run.start
        self.pos = chunks[run.start].offset
        self.digest = hashlib.sha256()
        self.failed = False
        self.whole = whole
        # Views of the bytes of the chunk in progress, from ``held_from``; the views
        # are dropped (and the file read back instead) past ``_HOLD`` bytes.
        self.held: list[memoryview] = []
        self.held_from = self.pos

    def feed(self, pieces: list[bytes]) -> tuple[range, int | None]:
        """Hash ``pieces``; the chunks they completed that matched, and the one that did not.

        After a mismatch, later bytes are ignored: the chunks after it are fetched again.
        """
        first = self.index
        if self.failed:
            return range(first, first), None
        chunks = self.chunks
        bad = None
        stream = self.held
        for piece in pieces:
            view = memoryview(piece)
            stream.append(view)
            while view:
                chunk = chunks[self.index]
                take = min(len(view), chunk.end - self.pos)
                self.digest.update(view[:take])
                self.pos += take
                view = view[take:]
                if self.pos == chunk.end:
                    if self.digest.hexdigest() != chunk.sha256:
                        self.failed = True
                        bad = self.index
                        break
                    self.index += 1
                    self.digest = hashlib.sha256()
            if bad is not None:
                break
        self._pass_on(range(first, self.index), stream)
        return range(first, self.index), bad

    def _pass_on(self, verified: range, stream: list[memoryview]) -> None:
        """Hand the verified bytes of ``stream`` to the whole digest; hold the rest."""
        done = self.chunks[verified.stop - 1].end if verified else self.held_from
        if verified:
            views, cut = [], self.held_from
            for k, view in enumerate(stream):
                if cut + len(view) > done:
                    views.append(view[: done - cut])
                    stream = [view[done - cut :], *stream[k + 1 :]]
                    break
                views.append(view)
                cut += len(view)
            else:
                stream = []
            self.whole.add(verified, self.held_from, views)
        self.held_from = done
        if self.failed or self.pos - done > _HOLD:  # drop them: read back when it matches
            stream = []
            self.held_from = self.pos
        self.held = stream


@dataclass(slots=True)
class _WriteJob:
    """A queued write-and-check job; ``reported`` once its verified chunks are counted."""

    future: asyncio.Future[tuple[range, int | None]]
    reported: bool = False


class ChunkWriter:
    """The sink for one run of consecutive chunks: writes, hashes, checks each chunk.

    Why a pipeline: writing and hashing run on one dedicated thread (in order, so one
    running digest is enough) while the event loop keeps receiving. The loop only
    buffers what arrives and hands it over per ``_FLUSH`` bytes (or at the end of the
    run): one job per MiB, whatever the chunk size, so a run of a million one-byte
    chunks is not a million jobs. At most ``_IN_FLIGHT`` jobs are queued, which
    bounds memory. Call :meth:`drain` after the transfer (also after a failure) to
    hand over the rest, wait for the thread and learn the last verdicts.
    """

    def __init__(
        self,
        fd: int,
        chunks: Sequence[Chunk],
        run: range,
        on_chunks: Callable[[range], None],
        *,
        pool: Executor,
        writer: PartWriter,
        whole: WholeDigest,
    ) -> None:
        self.fd = fd
        self.writer = writer
        self.on_chunks = on_chunks
        self.end = chunks[run[-1]].end
        self.pos = chunks[run.start].offset
        self.flushed = self.pos
        self.pieces: list[bytes] = []
        self._hashing = _RunHasher(chunks, run, whole)
        self._pool = pool
        self._pending: deque[_WriteJob] = deque()

    async def __call__(self, data: bytes) -> None:
        if len(data) > self.end - self.pos:
            raise DownloadError("the source sent more bytes than asked for")
        # The received object is kept as it is: no copy until the vectored write.
        self.pieces.append(data)
        self.pos += len(data)
        if self.pos == self.end or self.pos - self.flushed >= _FLUSH:
            await self._submit()

    async def _submit(self) -> None:
        """Queue the buffered bytes for writing and checking."""
        pieces, self.pieces = self.pieces, []
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(
            self._pool, _write_and_check, self.writer, self.fd, pieces, self.flushed, self._hashing
        )
        item = _WriteJob(job)
        job.add_done_callback(lambda _: self._report(item))
        self.flushed = self.pos
        self._pending.append(item)
        while len(self._pending) > _IN_FLIGHT:
            await self._settle()

    def _report(self, item: _WriteJob) -> None:
        """Count the chunks a job verified as soon as it ends (jobs end in order).

        Not only when the job is next awaited: that waits for more data, and a
        transfer that stalls would hide the progress already made. Called again by
        :meth:`_settle`, since an awaited future that is already done does not wait
        for its callbacks; the flag makes the second call a no-op.
        """
        job = item.future
        if item.reported or job.cancelled() or job.exception() is not None:
            return
        item.reported = True
        verified, _ = job.result()
        if verified:
            self.on_chunks(verified)

    async def _settle(self) -> None:
        item = self._pending.popleft()
        _, bad = await item.future
        self._report(item)
        if bad is not None:
            raise ChunkMismatch(bad)

    async def drain(self) -> None:
        """Hand over what is buffered, wait for queued writes; raise the first mismatch
        or write error among them."""
        try:
            if self.pieces:  # a transfer that broke off: keep the chunks it completed
                await self._submit()
            while self._pending:
                await self._settle()
        finally:
            for item in self._pending:
                with contextlib.suppress(BaseException):
                    await item.future
            self._pending.clear()


def _write_and_check(
    writer: PartWriter, fd: int, pieces: list[bytes], offset: int, hashing: _RunHasher
) -> tuple[range, int | None]:
    """Write ``pieces`` at ``offset`` (vectored: no join on the event loop), check them.

    The written range is handed to the kernel for write-back at once, so the disk
    works while the transfer goes on and the final fsync has little left to wait for.
    """
    writer.write_pieces(fd, pieces, offset)
    start_writeback(fd, offset, sum(map(len, pieces)))
    return hashing.feed(pieces)


def consecutive_runs(indices: Iterable[int]) -> list[range]:
    """Split sorted chunk indices into runs of consecutive ones (one request each)."""
    runs: list[range] = []
    lo = hi = -1
    for i in indices:
        if i == hi:
            hi += 1
            continue
        if hi > lo:
            runs.append(range(lo, hi))
        lo, hi = i, i + 1
    if hi > lo:
        runs.append(range(lo, hi))
    return runs


def copy_same_offset(
    src: Path, fd: int, chunks: Sequence[Chunk], batch: range, writer: PartWriter
) -> list[int]:
    """Copy the chunks of ``batch`` that still match in the old file ``src`` into the
    temp file, at the same offsets; return the indices that did not (to be fetched).

    One open and one read per batch. The bytes written are the bytes hashed (one
    buffer), so a file changing meanwhile costs a fetch, never a wrong byte. A read
    error only means "fetch these"; a write error (``ENOSPC``) propagates.
    """
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return list(batch)
    try:
        start = chunks[batch.start].offset
        span = chunks[batch[-1]].end - start
        if span > BATCH_BYTES:  # one large chunk: copied streaming, hashed on the way
            return [] if _copy_large(src_fd, fd, chunks[batch.start], writer) else [batch.start]
        view = thread_buffer()[:span]
        try:
            got = read_into(src_fd, view, start)
        except OSError:
            return list(batch)
    finally:
        os.close(src_fd)
    bad = mismatches_in(view[:got], start, chunks, batch)
    lo = batch.start
    for stop in [*bad, batch.stop]:  # write each stretch of good chunks at once
        if stop > lo:
            first, end = chunks[lo].offset, chunks[stop - 1].end
            writer.write(fd, view[first - start : end - start], first)
        lo = stop + 1
    return bad


def _copy_large(src_fd: int, fd: int, chunk: Chunk, writer: PartWriter) -> bool:
    """Copy one chunk larger than the buffer piece by piece; whether it matched.

    A mismatch leaves unchecked bytes in the temp file where that chunk goes; they are
    overwritten when the chunk is fetched, and never trusted (resume re-hashes).
    """
    digest = hashlib.sha256()
    buf = thread_buffer()
    pos = chunk.offset
    while pos < chunk.end:
        want = min(BUFFER_SIZE, chunk.end - pos)
        try:
            got = read_into(src_fd, buf[:want], pos)
        except OSError:
            return False
        if got < want:
            return False
        digest.update(buf[:got])
        writer.write(fd, buf[:got], pos)
        pos += got
    return digest.hexdigest() == chunk.sha256


@dataclass(frozen=True, slots=True)
class Donor:
    """A place in the store that should hold a chunk's bytes: a manifest path, an offset."""

    path: str
    offset: int


def _copy_from(  # noqa: PLR0917 - one thread job's private helper
    guard: PathGuard,
    root: Path,
    donors: Sequence[Donor],
    fd: int,
    chunk: Chunk,
    opened: dict[str, int | None],
    writer: PartWriter,
) -> bool:
    """Copy ``chunk``'s bytes from the first donor that still holds them (re-hashed).

    Donor files are opened once and kept in ``opened`` (path -> fd, or ``None`` when
    it cannot be opened) for the caller to close.
    """
    for donor in donors:
        if donor.path not in opened:
            try:
                guard.check(donor.path)
                opened[donor.path] = os.open(root / donor.path, os.O_RDONLY | os.O_NOFOLLOW)
            except (OSError, UnsafePathError):
                opened[donor.path] = None
        src = opened[donor.path]
        if src is None:
            continue
        try:
            data = os.pread(src, chunk.size, donor.offset)
        except OSError:
            continue
        if len(data) == chunk.size and hashlib.sha256(data).hexdigest() == chunk.sha256:
            writer.write(fd, data, chunk.offset)
            return True
    return False


def copy_from_donors(  # noqa: PLR0917 - one thread job
    guard: PathGuard,
    root: Path,
    donors: Mapping[int, tuple[Donor, ...]],
    fd: int,
    chunks: Sequence[Chunk],
    batch: range,
    writer: PartWriter,
) -> list[int]:
    """Copy each chunk of ``batch`` from its donors; the indices none could give.

    Donor files stay open for the batch: one ``open`` per donor file, not per chunk.
    """
    opened: dict[str, int | None] = {}
    try:
        return [
            i
            for i in batch
            if not _copy_from(guard, root, donors[i], fd, chunks[i], opened, writer)
        ]
    finally:
        for src in opened.values():
            if src is not None:
                os.close(src)


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """Where a build may find chunks locally, and the thread job that copies them.

    ``held``: the chunk indices local files may hold. ``copy(dest, fd, batch,
    writer)`` copies the chunks of ``batch`` into the partial file ``fd`` through
    ``writer`` (re-hashed first) and returns the indices it could not. ``note``:
    logged when some could not.
    """

    held: Collection[int]
    copy: Callable[[Path, int, range, PartWriter], list[int]]
    note: str = ""


def same_offset_copy(chunks: Sequence[Chunk], bad: Iterable[int]) -> LocalCopy:
    """Repair's local step: the current file's chunks at the same offsets, but ``bad``."""
    skip = set(bad)
    held = [i for i in range(len(chunks)) if i not in skip]
    return LocalCopy(
        held, lambda dest, fd, batch, writer: copy_same_offset(dest, fd, chunks, batch, writer)
    )


def donor_copy(
    guard: PathGuard, root: Path, chunks: Sequence[Chunk], donors: Mapping[int, tuple[Donor, ...]]
) -> LocalCopy:
    """Update's local step: any local file holding the same bytes (its donors)."""
    return LocalCopy(
        donors.keys(),
        lambda _dest, fd, batch, writer: copy_from_donors(
            guard, root, donors, fd, chunks, batch, writer
        ),
        "local chunks changed since the manifest; fetching them instead",
    )
