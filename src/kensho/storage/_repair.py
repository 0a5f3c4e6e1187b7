"""Repair of one file: build it in ``.kensho/tmp``, chunk by verified chunk, then swap.

For each chunk of the target, in order of preference:

1. it is already good in the partial file left by an interrupted run (resume);
2. it is good in the current file at the same offset (only bad chunks are fetched);
3. it is fetched from the first source that delivers it with the right hash.

Every byte that reaches the temp file is hashed on its way in, so when the last chunk
matches, the whole file is proven; then fsync, ``os.replace`` over the final path and
fsync of the folder. The temp file never grows past the declared size. Until the
swap, the final path keeps its old content, whatever happens (crash, ``ENOSPC``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kensho.errors import DiskSpaceError, DownloadError, SourceError
from kensho.events import (
    StorageChunkRejected,
    StorageDownloadProgress,
    StorageFileRepaired,
    StorageSourceFailed,
)
from kensho.storage._fs import UnsafePathError, fsync_dir, resolve_inside
from kensho.storage._verify import Emit
from kensho.storage.hashing import (
    BATCH_BYTES,
    BUFFER_SIZE,
    Hasher,
    chunks_within,
    mismatches_in,
    read_into,
    run_to_completion,
    sha256_range,
    thread_buffer,
)
from kensho.storage.manifest import Chunk, FileEntry
from kensho.storage.sources import Source, SourceUnreachableError
from kensho.storage.state import StatRecord
from kensho.storage.status import FileReport, FileStatus
from kensho.telemetry import get_logger

__all__ = ["FileRepairer", "RepairOutcome", "part_path"]

_FLUSH = 1 << 20
_IN_FLIGHT = 8  # queued write jobs per transfer, at most _FLUSH bytes each (or a chunk)
_log = get_logger("storage")
_DISTRUSTED = "skipped, it sent wrong bytes earlier in this run"


def part_path(tmp_dir: Path, entry: FileEntry) -> Path:
    """The temp file for ``entry``: named by its path, so a resume finds it again."""
    digest = hashlib.sha256(entry.path.encode()).hexdigest()[:32]
    return tmp_dir / f"{digest}.part"


@dataclass(slots=True)
class RepairOutcome:
    """How one file's repair went. ``unreachable`` means no source could be reached."""

    ok: bool
    reason: str = ""
    unreachable: bool = False
    fetched: int = 0
    record: StatRecord | None = None
    sources: list[str] = field(default_factory=list)


class _ChunkMismatch(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(f"chunk {index} does not match its hash")
        self.index = index


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _RunHasher:
    """Checks the bytes of one run of consecutive chunks, chunk by chunk, as they come.

    Lives on the writer thread: its jobs run one after the other, in order, so the
    running digest needs no lock, and the event loop never touches a chunk boundary.
    """

    def __init__(self, chunks: Sequence[Chunk], run: range) -> None:
        self.chunks = chunks
        self.index = run.start
        self.pos = chunks[run.start].offset
        self.digest = hashlib.sha256()
        self.failed = False

    def feed(self, pieces: list[bytes]) -> tuple[range, int | None]:
        """Hash ``pieces``; the chunks they completed that matched, and the one that did not.

        After a mismatch, later bytes are ignored: the chunks after it are fetched again.
        """
        first = self.index
        if self.failed:
            return range(first, first), None
        chunks = self.chunks
        for piece in pieces:
            view = memoryview(piece)
            while view:
                chunk = chunks[self.index]
                take = min(len(view), chunk.end - self.pos)
                self.digest.update(view[:take])
                self.pos += take
                view = view[take:]
                if self.pos == chunk.end:
                    if self.digest.hexdigest() != chunk.sha256:
                        self.failed = True
                        return range(first, self.index), self.index
                    self.index += 1
                    self.digest = hashlib.sha256()
        return range(first, self.index), None


@dataclass(slots=True)
class _WriteJob:
    """A queued write-and-check job; ``reported`` once its verified chunks are counted."""

    future: asyncio.Future[tuple[range, int | None]]
    reported: bool = False


class _ChunkWriter:
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
        pool: Executor,
    ) -> None:
        self.fd = fd
        self.on_chunks = on_chunks
        self.end = chunks[run[-1]].end
        self.pos = chunks[run.start].offset
        self.flushed = self.pos
        self.pieces: list[bytes] = []
        self._hashing = _RunHasher(chunks, run)
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
            self._pool, _write_and_check, self.fd, pieces, self.flushed, self._hashing
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
            raise _ChunkMismatch(bad)

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
    fd: int, pieces: list[bytes], offset: int, hashing: _RunHasher
) -> tuple[range, int | None]:
    """Write ``pieces`` at ``offset`` (vectored: no join on the event loop), check them."""
    _pwritev_all(fd, pieces, offset)
    return hashing.feed(pieces)


def _pwritev_all(fd: int, pieces: list[bytes], offset: int) -> None:
    if not hasattr(os, "pwritev"):  # pragma: no cover - not Linux or BSD
        _pwrite_all(fd, b"".join(pieces), offset)
        return
    for start in range(0, len(pieces), 512):  # stay below IOV_MAX
        batch = pieces[start : start + 512]
        want = sum(map(len, batch))
        written = os.pwritev(fd, batch, offset)
        if written < want:  # short write: finish the rest piece by piece
            _pwrite_all(fd, b"".join(batch)[written:], offset + written)
        offset += want


def _runs(indices: Iterable[int]) -> list[range]:
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


def _copy_chunks(src: Path, fd: int, chunks: Sequence[Chunk], batch: range) -> list[int]:
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
            return [] if _copy_large(src_fd, fd, chunks[batch.start]) else [batch.start]
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
            _pwrite_all(fd, view[first - start : end - start], first)
        lo = stop + 1
    return bad


def _copy_large(src_fd: int, fd: int, chunk: Chunk) -> bool:
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
        _pwrite_all(fd, buf[:got], pos)
        pos += got
    return digest.hexdigest() == chunk.sha256


def _open_part(part: Path, size: int) -> tuple[int, int]:
    """Open (or create) the temp file; return its fd and its size before truncation."""
    part.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(part, flags, 0o644)
    before = os.fstat(fd).st_size
    os.ftruncate(fd, size)
    return fd, before


def _place(fd: int, part: Path, dest: Path) -> StatRecord:
    os.fsync(fd)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part.replace(dest)
    fsync_dir(dest.parent)
    return StatRecord.of(dest.lstat())


@dataclass
class FileRepairer:
    """Repairs files of one store from an ordered list of sources."""

    root: Path
    tmp_dir: Path
    sources: Sequence[Source]
    hasher: Hasher
    emit: Emit
    mismatch_retries: int = 3
    free_space: Callable[[Path], int] = field(
        default=lambda p: shutil.disk_usage(p).free, repr=False
    )
    #: Sources that sent bytes contradicting the manifest ``mismatch_retries`` times:
    #: skipped for every later file of this run (a lying mirror is not asked again).
    distrusted: set[str] = field(default_factory=set)
    #: Chunks rejected per source during this run.
    rejected: dict[str, int] = field(default_factory=dict)

    async def repair(self, entry: FileEntry, report: FileReport) -> RepairOutcome:
        """Make ``entry`` good at its final path, or say why it could not be."""
        if report.status == FileStatus.UNSAFE:
            return RepairOutcome(False, report.detail or "unsafe path")
        part = part_path(self.tmp_dir, entry)
        try:
            dest = await asyncio.to_thread(resolve_inside, self.root, entry.path)
            fd, before = await run_to_completion(None, _open_part, part, entry.size)
        except UnsafePathError as exc:
            return RepairOutcome(False, str(exc))
        except OSError as exc:
            return RepairOutcome(False, f"cannot create {part}: {exc.strerror or exc}")
        try:
            todo = await self._reuse(entry, report, fd, part=part, before=before, dest=dest)
            reused = entry.size - sum(entry.chunks[i].size for i in todo)
            outcome = await self._fetch(entry, fd, todo)
            if outcome.ok:
                outcome = await self.check_whole(entry, fd, part, outcome)
            if not outcome.ok:
                return outcome
            outcome.record = await run_to_completion(None, _place, fd, part, dest)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full(entry, part, dest) from exc
            return RepairOutcome(
                False, f"cannot write {part} or move it to {dest}: {exc.strerror or exc}"
            )
        finally:
            os.close(fd)
        used = tuple(dict.fromkeys(outcome.sources))
        self.emit(
            StorageFileRepaired(
                path=entry.path, fetched=outcome.fetched, reused=reused, sources=used
            )
        )
        _log.info("file repaired", path=entry.path, fetched=outcome.fetched, reused=reused)
        return outcome

    async def check_whole(
        self, entry: FileEntry, fd: int, part: Path, outcome: RepairOutcome
    ) -> RepairOutcome:
        """``outcome``, or a failure if the built file's whole SHA-256 is not ``entry``'s.

        Why on top of the chunk hashes: matching chunks prove the file against the
        chunk list, but a manifest whose chunk list and ``sha256`` disagree cannot be
        told at parse time without the data. Repair and update both check here,
        before placing, so such a manifest is refused the same way by both (and the
        partial file, proven wrong, is deleted). Also fsyncs the partial file.
        """
        await self.hasher.run(os.fsync, fd)
        whole = await self.hasher.run(sha256_range, part, 0, entry.size)
        if whole == entry.sha256:
            return outcome
        await asyncio.to_thread(part.unlink, missing_ok=True)
        return RepairOutcome(
            False,
            "every chunk matched but the whole file's SHA-256 does not match the "
            "manifest's: the manifest is inconsistent; ask its publisher for a rebuilt one",
            fetched=outcome.fetched,
            sources=outcome.sources,
        )

    def _disk_full(self, entry: FileEntry, part: Path, dest: Path) -> DiskSpaceError:
        with contextlib.suppress(OSError):
            part.unlink()
        free = self.free_space(self.tmp_dir)
        return DiskSpaceError(
            f"the disk filled up while writing {entry.path}; {dest} was left as it was. "
            f"Free at least {entry.size} bytes on the file system of {self.root} "
            "and run the sync again",
            needed=entry.size,
            free=free,
        )

    async def _reuse(
        self, entry: FileEntry, report: FileReport, fd: int, *, part: Path, before: int, dest: Path
    ) -> list[int]:
        """Return the indices of chunks that still have to be fetched (sorted).

        Both steps work in batches of adjacent chunks (:mod:`.hashing`), so their cost
        follows the bytes, not the number of chunks.
        """
        chunks = entry.chunks
        if before:  # resume: trust only what hashes right in the partial file
            fits = chunks_within(chunks, before)
            todo = await self.hasher.mismatched(part, chunks, range(fits))
            todo.extend(range(fits, len(chunks)))
        else:
            todo = list(range(len(chunks)))
        if report.status in {FileStatus.CORRUPT, FileStatus.WRONG_SIZE} and report.size:
            bad = set(report.bad_chunks)
            candidates = [i for i in todo if i not in bad]

            async def copy(batch: range) -> list[int]:
                return await self.hasher.run(_copy_chunks, dest, fd, chunks, batch)

            missed = await self.hasher.in_batches(chunks, candidates, copy)
            todo = sorted([i for i in todo if i in bad] + missed)
        return todo

    async def _fetch(self, entry: FileEntry, fd: int, todo: list[int]) -> RepairOutcome:
        if not todo:
            return RepairOutcome(True)
        if not self.sources:
            return RepairOutcome(False, "no source is configured (pass --source)", True)
        chunks = entry.chunks
        total = sum(chunks[i].size for i in todo)
        done = bytearray(len(chunks))  # 1: written and verified (a byte, not an object, per chunk)
        fetched = [0]
        used: list[str] = []
        errors: list[str] = []
        unreachable = True
        # One writer thread for the whole file: its runs are fetched one after the other.
        with ThreadPoolExecutor(1, thread_name_prefix="kensho-write") as pool:
            for n, source in enumerate(self.sources):
                nxt = self.sources[n + 1].name if n + 1 < len(self.sources) else None
                if source.name in self.distrusted:
                    errors.append(f"{source.name}: {_DISTRUSTED}")
                    continue

                def on_chunks(run: range, src: Source = source) -> None:  # once per write job
                    done[run.start : run.stop] = b"\x01" * len(run)
                    fetched[0] += chunks[run[-1]].end - chunks[run.start].offset
                    self.emit(
                        StorageDownloadProgress(
                            path=entry.path, source=src.name, done=fetched[0], total=total
                        )
                    )

                error = await self._from_source(
                    entry, fd, source, todo, done=done, on_chunks=on_chunks, pool=pool
                )
                finished = all(done[i] for i in todo)
                if finished or error is None:
                    used.append(source.name)
                if error is not None:
                    unreachable = unreachable and isinstance(error, SourceUnreachableError)
                    errors.append(f"{source.name}: {error}")
                    self.emit(
                        StorageSourceFailed(
                            path=entry.path, source=source.name, error=str(error), next_source=nxt
                        )
                    )
                    _log.warning(
                        "source failed", path=entry.path, source=source.name, error=str(error)
                    )
                if finished:
                    return RepairOutcome(True, fetched=fetched[0], sources=used)
        reason = "; ".join(errors) or "no source could deliver it"
        return RepairOutcome(False, reason, unreachable, fetched[0], sources=used)

    async def _from_source(
        self,
        entry: FileEntry,
        fd: int,
        source: Source,
        todo: list[int],
        *,
        done: bytearray,
        on_chunks: Callable[[range], None],
        pool: Executor,
    ) -> SourceError | None:
        """Fetch what is left of ``todo`` from one source; the error that stopped it."""
        mismatches = 0
        chunks = entry.chunks
        while remaining := [i for i in todo if not done[i]]:
            try:
                for run in _runs(remaining):
                    start = chunks[run.start].offset
                    length = chunks[run[-1]].end - start
                    writer = _ChunkWriter(fd, chunks, run, on_chunks, pool)
                    try:
                        await source.fetch(entry.path, start, length, entry.size, writer)
                    finally:
                        await writer.drain()
                    if done.find(0, run.start, run.stop) != -1:
                        raise DownloadError("the source delivered fewer bytes than asked for")
            except _ChunkMismatch as exc:
                mismatches += 1
                self.rejected[source.name] = self.rejected.get(source.name, 0) + 1
                self.emit(
                    StorageChunkRejected(
                        path=entry.path, source=source.name, chunk=exc.index, attempt=mismatches
                    )
                )
                _log.warning("chunk rejected", path=entry.path, source=source.name, chunk=exc.index)
                if mismatches >= self.mismatch_retries:
                    self.distrusted.add(source.name)
                    _log.warning(
                        "source distrusted for the rest of the run",
                        source=source.name,
                        rejected_chunks=self.rejected[source.name],
                    )
                    return DownloadError(
                        f"sent wrong bytes for chunk {exc.index} {mismatches} times"
                    )
            except SourceError as exc:
                return exc
        return None
