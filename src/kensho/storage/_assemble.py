"""Building one file from chunks in ``.kensho/tmp``: the layer repair and update share.

For each chunk of the target, in order of preference:

1. it is already good in the partial file left by an interrupted run (resume);
2. a local file holds it: the caller picks which (repair: the current file at the
   same offset; update: any file with the same bytes), re-hashed before it is used;
3. it is fetched from the first source that delivers it with the right hash
   (failover, and a source that keeps sending wrong bytes is distrusted for the run).

Every byte that reaches the partial file is hashed on its way in; then the whole
file's SHA-256 is checked and the file fsynced. Placing it (``os.replace`` over the
final path, fsync of the folder) is the caller's choice: repair places each file at
once, update only once every required file is built. The partial file never grows
past the declared size, and until the swap the final path keeps its old content,
whatever happens (crash, ``ENOSPC``).

Why one module: repair and update differ only in where local chunks come from and
when files are placed; everything else (the write path, the disk-full error, the
source failover) is one code path, so a fix or a test of it covers both.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kensho.errors import (
    DiskSpaceError,
    DownloadError,
    SourceError,
    SourceUnreachableError,
    UnsafePathError,
)
from kensho.events import StorageChunkRejected, StorageDownloadProgress, StorageSourceFailed
from kensho.storage._fs import PathGuard, fsync_dir, resolve_inside
from kensho.storage._verify import Emit
from kensho.storage.hashing import (
    BATCH_BYTES,
    BUFFER_SIZE,
    IOPool,
    chunks_within,
    mismatches_in,
    read_into,
    run_to_completion,
    sha256_range,
    thread_buffer,
)
from kensho.storage.manifest import Chunk, FileEntry
from kensho.storage.sources import Source
from kensho.storage.state import StatRecord
from kensho.telemetry import get_logger

__all__ = [
    "BuildOutcome",
    "Built",
    "Donor",
    "FileAssembler",
    "LocalCopy",
    "consecutive_runs",
    "copy_from_donors",
    "copy_same_offset",
    "donor_copy",
    "part_path",
    "same_offset_copy",
]

_FLUSH = 1 << 20
_IN_FLIGHT = 8  # queued write jobs per transfer, at most _FLUSH bytes each (or a chunk)
_log = get_logger("storage")
_DISTRUSTED = "skipped, it sent wrong bytes earlier in this run"


def part_path(tmp_dir: Path, entry: FileEntry) -> Path:
    """The temp file for ``entry``: named by its path, so a resume finds it again."""
    digest = hashlib.sha256(entry.path.encode()).hexdigest()[:32]
    return tmp_dir / f"{digest}.part"


@dataclass(slots=True)
class BuildOutcome:
    """How building one file went (repair or update).

    ``unreachable`` means no source could be reached.
    """

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


def copy_same_offset(src: Path, fd: int, chunks: Sequence[Chunk], batch: range) -> list[int]:
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
    """Open (or create) the partial file; return its fd and its size before truncation."""
    part.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(part, flags, 0o644)
    before = os.fstat(fd).st_size
    os.ftruncate(fd, size)
    return fd, before


def _swap_in(part: Path, dest: Path) -> StatRecord:
    """Move a built (fsynced) partial file over ``dest``; fsync the folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part.replace(dest)
    fsync_dir(dest.parent)
    return StatRecord.of(dest.lstat())


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
            _pwrite_all(fd, data, chunk.offset)
            return True
    return False


def copy_from_donors(  # noqa: PLR0917 - one thread job
    guard: PathGuard,
    root: Path,
    donors: Mapping[int, tuple[Donor, ...]],
    fd: int,
    chunks: Sequence[Chunk],
    batch: range,
) -> list[int]:
    """Copy each chunk of ``batch`` from its donors; the indices none could give.

    Donor files stay open for the batch: one ``open`` per donor file, not per chunk.
    """
    opened: dict[str, int | None] = {}
    try:
        return [i for i in batch if not _copy_from(guard, root, donors[i], fd, chunks[i], opened)]
    finally:
        for src in opened.values():
            if src is not None:
                os.close(src)


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """Where a build may find chunks locally, and the thread job that copies them.

    ``held``: the chunk indices local files may hold. ``copy(dest, fd, batch)``
    copies the chunks of ``batch`` into the partial file ``fd`` (re-hashed first)
    and returns the indices it could not. ``note``: logged when some could not.
    """

    held: Collection[int]
    copy: Callable[[Path, int, range], list[int]]
    note: str = ""


def same_offset_copy(chunks: Sequence[Chunk], bad: Iterable[int]) -> LocalCopy:
    """Repair's local step: the current file's chunks at the same offsets, but ``bad``."""
    skip = set(bad)
    held = [i for i in range(len(chunks)) if i not in skip]
    return LocalCopy(held, lambda dest, fd, batch: copy_same_offset(dest, fd, chunks, batch))


def donor_copy(
    guard: PathGuard, root: Path, chunks: Sequence[Chunk], donors: Mapping[int, tuple[Donor, ...]]
) -> LocalCopy:
    """Update's local step: any local file holding the same bytes (its donors)."""
    return LocalCopy(
        donors.keys(),
        lambda _dest, fd, batch: copy_from_donors(guard, root, donors, fd, chunks, batch),
        "local chunks changed since the manifest; fetching them instead",
    )


@dataclass(slots=True)
class Built:
    """One file built in ``.kensho/tmp`` (placed already when ``outcome.record`` is set).

    ``reused``: bytes that did not have to be fetched. ``in_place``: the final path
    already held the new file, so there is nothing to build or swap.
    """

    part: Path
    dest: Path | None
    outcome: BuildOutcome
    reused: int = 0
    in_place: bool = False


@dataclass
class FileAssembler:
    """Builds files of one store from local chunks and an ordered list of sources.

    One per run: a source it distrusts (wrong bytes) stays distrusted for every
    later file of the run. Its methods hold no per-file state, so files can be
    built concurrently.
    """

    root: Path
    tmp_dir: Path
    sources: Sequence[Source]
    io: IOPool
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

    async def build(
        self,
        entry: FileEntry,
        *,
        local: LocalCopy | None = None,
        place: bool,
        already_there: Callable[[Path], Awaitable[bool]] | None = None,
    ) -> Built:
        """Build ``entry`` in its partial file; place it too when ``place``.

        ``local`` says where local chunks may be found (:class:`LocalCopy`);
        ``already_there(dest)`` says whether the final path already
        holds the new file (then nothing is built). ``DiskSpaceError`` propagates
        (the partial file is deleted, the final path untouched); any other failure
        is the outcome's reason.
        """
        part = part_path(self.tmp_dir, entry)
        try:
            dest = await asyncio.to_thread(resolve_inside, self.root, entry.path)
            if already_there is not None and await already_there(dest):
                await asyncio.to_thread(part.unlink, missing_ok=True)
                return Built(part, dest, BuildOutcome(True), entry.size, in_place=True)
            fd, before = await run_to_completion(None, _open_part, part, entry.size)
        except UnsafePathError as exc:
            return Built(part, None, BuildOutcome(False, str(exc)))
        except OSError as exc:
            return Built(
                part, None, BuildOutcome(False, f"cannot create {part}: {exc.strerror or exc}")
            )
        try:
            todo = await self._resumed(entry, part, before)
            if local is not None:
                todo = await self._copy_local(entry, fd, dest, todo, local)
            reused = entry.size - sum(entry.chunks[i].size for i in todo)
            outcome = await self._fetch(entry, fd, todo)
            if outcome.ok:
                outcome = await self._check_whole(entry, fd, part, outcome)
            if outcome.ok and place:
                outcome.record = await self.place(part, dest)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full(entry, part, dest) from exc
            moving = f" or move it to {dest}" if place else ""
            reason = f"cannot write {part}{moving}: {exc.strerror or exc}"
            return Built(part, dest, BuildOutcome(False, reason))
        finally:
            os.close(fd)
        return Built(part, dest, outcome, reused)

    async def place(self, part: Path, dest: Path) -> StatRecord:
        """Swap a built partial file in at ``dest``; its new record."""
        return await run_to_completion(None, _swap_in, part, dest)

    async def _check_whole(
        self, entry: FileEntry, fd: int, part: Path, outcome: BuildOutcome
    ) -> BuildOutcome:
        """``outcome``, or a failure if the built file's whole SHA-256 is not ``entry``'s.

        Why on top of the chunk hashes: matching chunks prove the file against the
        chunk list, but a manifest whose chunk list and ``sha256`` disagree cannot be
        told at parse time without the data (and a new release may come from another
        chunker). Such a manifest is refused instead of placed, and the partial file,
        proven wrong, is deleted. Also fsyncs the partial file.
        """
        await self.io.run(os.fsync, fd)
        whole = await self.io.run(sha256_range, part, 0, entry.size)
        if whole == entry.sha256:
            return outcome
        await asyncio.to_thread(part.unlink, missing_ok=True)
        return BuildOutcome(
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

    async def _resumed(self, entry: FileEntry, part: Path, before: int) -> list[int]:
        """The indices of chunks not already good in the partial file (sorted).

        Only what hashes right is trusted; hashed in batches of adjacent chunks
        (:mod:`.hashing`), so the cost follows the bytes, not the number of chunks.
        """
        chunks = entry.chunks
        if not before:
            return list(range(len(chunks)))
        fits = chunks_within(chunks, before)
        todo = await self.io.mismatched(part, chunks, range(fits))
        todo.extend(range(fits, len(chunks)))
        return todo

    async def _copy_local(
        self, entry: FileEntry, fd: int, dest: Path, todo: list[int], local: LocalCopy
    ) -> list[int]:
        """Copy the chunks of ``todo`` that ``local`` may hold; the indices still to fetch."""
        held = local.held
        candidates = [i for i in todo if i in held]

        async def job(batch: range) -> list[int]:  # one thread job per batch, not per chunk
            return await self.io.run(local.copy, dest, fd, batch)

        missed = await self.io.in_batches(entry.chunks, candidates, job)
        if missed and local.note:
            _log.warning(local.note, path=entry.path, chunks=len(missed))
        return sorted([i for i in todo if i not in held] + missed)

    async def _fetch(self, entry: FileEntry, fd: int, todo: list[int]) -> BuildOutcome:
        if not todo:
            return BuildOutcome(True)
        if not self.sources:
            return BuildOutcome(False, "no source is configured (pass --source)", True)
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
                    return BuildOutcome(True, fetched=fetched[0], sources=used)
        reason = "; ".join(errors) or "no source could deliver it"
        return BuildOutcome(False, reason, unreachable, fetched[0], sources=used)

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
                for run in consecutive_runs(remaining):
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
