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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from kensho.storage.hashing import Hasher, run_all, run_to_completion, sha256_range
from kensho.storage.manifest import Chunk, FileEntry
from kensho.storage.sources import Source, SourceUnreachableError
from kensho.storage.state import StatRecord
from kensho.storage.status import FileReport, FileStatus
from kensho.telemetry import get_logger

__all__ = ["FileRepairer", "RepairOutcome", "part_path"]

_FLUSH = 1 << 20
_IN_FLIGHT = 8  # queued write jobs per transfer, at most _FLUSH bytes each (or a chunk)
_log = get_logger("storage")


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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _ChunkWriter:
    """The sink for one run of consecutive chunks: writes, hashes, checks each chunk.

    Why a pipeline: writing and hashing run on one dedicated thread (in order, so one
    running digest per chunk is enough) while the event loop keeps receiving; at
    most ``_IN_FLIGHT`` jobs are queued, which bounds memory. Call :meth:`drain`
    after the transfer (also after a failure) to wait for the thread and learn the
    last verdicts.
    """

    def __init__(
        self,
        fd: int,
        chunks: Sequence[tuple[int, Chunk]],
        on_chunk: Callable[[int, Chunk], None],
    ) -> None:
        self.fd = fd
        self.chunks = list(chunks)
        self._by_index = dict(self.chunks)
        self.on_chunk = on_chunk
        self.next = 0
        self.pos = self.chunks[0][1].offset
        self.flushed = self.pos
        self.pieces: list[bytes] = []
        self.digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kensho-write")
        self._pending: deque[tuple[asyncio.Future[str | None], int | None]] = deque()

    async def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.next >= len(self.chunks):
                raise DownloadError("the source sent more bytes than asked for")
            index, chunk = self.chunks[self.next]
            take = min(len(view), chunk.end - self.pos)
            # The common case keeps the received object: no copy until the join.
            self.pieces.append(data if take == len(data) else bytes(view[:take]))
            self.pos += take
            view = view[take:]
            if self.pos == chunk.end:
                await self._submit(index)
                self.digest = hashlib.sha256()
                self.next += 1
            elif self.pos - self.flushed >= _FLUSH:
                await self._submit(None)

    async def _submit(self, finishing: int | None) -> None:
        """Queue the buffered bytes; ``finishing`` is the chunk they complete, if any."""
        pieces, self.pieces = self.pieces, []
        size = sum(map(len, pieces))
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(
            self._pool, _write_hash_finish, self.fd, pieces, self.flushed, self.digest, finishing
        )
        self.flushed += size
        self._pending.append((job, finishing))
        while len(self._pending) > _IN_FLIGHT:
            await self._settle()

    async def _settle(self) -> None:
        job, finishing = self._pending.popleft()
        digest = await job
        if finishing is not None:
            chunk = self._by_index[finishing]
            if digest != chunk.sha256:
                raise _ChunkMismatch(finishing)
            self.on_chunk(finishing, chunk)

    async def drain(self) -> None:
        """Wait for queued writes; raise the first mismatch or write error among them."""
        try:
            while self._pending:
                await self._settle()
        finally:
            for job, _ in self._pending:
                with contextlib.suppress(BaseException):
                    await job
            self._pending.clear()
            self._pool.shutdown(wait=True)


def _write_hash_finish(
    fd: int, pieces: list[bytes], offset: int, digest: hashlib._Hash, finishing: int | None
) -> str | None:
    """Write ``pieces`` at ``offset`` (vectored: no join on the event loop) and hash them."""
    _pwritev_all(fd, pieces, offset)
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest() if finishing is not None else None


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


def _runs(indices: Sequence[int]) -> list[list[int]]:
    """Split sorted chunk indices into runs of consecutive ones (one request each)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _copy_chunk(src: Path, fd: int, chunk: Chunk) -> bool:
    """Copy one chunk from the old file into the temp file if it still matches."""
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        data = os.pread(src_fd, chunk.size, chunk.offset)
    finally:
        os.close(src_fd)
    if len(data) != chunk.size or hashlib.sha256(data).hexdigest() != chunk.sha256:
        return False
    _pwrite_all(fd, data, chunk.offset)
    return True


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
            reused = sum(entry.chunks[i].size for i in range(len(entry.chunks)) if i not in todo)
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
        """Return the indices of chunks that still have to be fetched."""
        todo = list(range(len(entry.chunks)))
        if before:  # resume: trust only what hashes right in the partial file
            fits = [i for i in todo if entry.chunks[i].end <= before]
            digests = await run_all(
                self.hasher.run(sha256_range, part, entry.chunks[i].offset, entry.chunks[i].size)
                for i in fits
            )
            good = {i for i, d in zip(fits, digests, strict=True) if d == entry.chunks[i].sha256}
            todo = [i for i in todo if i not in good]
        if report.status in {FileStatus.CORRUPT, FileStatus.WRONG_SIZE} and report.size:
            bad = set(report.bad_chunks)
            candidates = [i for i in todo if i not in bad]
            copied = await run_all(
                self.hasher.run(_copy_chunk, dest, fd, entry.chunks[i]) for i in candidates
            )
            done = {i for i, ok in zip(candidates, copied, strict=True) if ok}
            todo = [i for i in todo if i not in done]
        return todo

    async def _fetch(self, entry: FileEntry, fd: int, todo: list[int]) -> RepairOutcome:
        if not todo:
            return RepairOutcome(True)
        if not self.sources:
            return RepairOutcome(False, "no source is configured (pass --source)", True)
        total = sum(entry.chunks[i].size for i in todo)
        done: set[int] = set()
        fetched = [0]
        used: list[str] = []
        errors: list[str] = []
        unreachable = True
        for n, source in enumerate(self.sources):
            nxt = self.sources[n + 1].name if n + 1 < len(self.sources) else None
            if source.name in self.distrusted:
                errors.append(f"{source.name}: skipped, it sent wrong bytes earlier in this run")
                continue

            def on_chunk(index: int, chunk: Chunk, src: Source = source) -> None:
                done.add(index)
                fetched[0] += chunk.size
                self.emit(
                    StorageDownloadProgress(
                        path=entry.path, source=src.name, done=fetched[0], total=total
                    )
                )

            error = await self._from_source(entry, fd, source, todo, done=done, on_chunk=on_chunk)
            if done.issuperset(todo) or error is None:
                used.append(source.name)
            if error is not None:
                unreachable = unreachable and isinstance(error, SourceUnreachableError)
                errors.append(f"{source.name}: {error}")
                self.emit(
                    StorageSourceFailed(
                        path=entry.path, source=source.name, error=str(error), next_source=nxt
                    )
                )
                _log.warning("source failed", path=entry.path, source=source.name, error=str(error))
            if done.issuperset(todo):
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
        done: set[int],
        on_chunk: Callable[[int, Chunk], None],
    ) -> SourceError | None:
        """Fetch what is left of ``todo`` from one source; the error that stopped it."""
        mismatches = 0
        while remaining := [i for i in todo if i not in done]:
            try:
                for run in _runs(remaining):
                    start = entry.chunks[run[0]].offset
                    length = entry.chunks[run[-1]].end - start
                    writer = _ChunkWriter(fd, [(i, entry.chunks[i]) for i in run], on_chunk)
                    try:
                        await source.fetch(entry.path, start, length, entry.size, writer)
                    finally:
                        await writer.drain()
                    if not done.issuperset(run):
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
