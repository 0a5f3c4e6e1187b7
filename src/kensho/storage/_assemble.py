"""Building one file from chunks in ``.kensho/tmp``: the layer repair and update share.

For each chunk of the target, in order of preference:

1. it is already good in the partial file left by an interrupted run (resume);
2. a local file holds it: the caller picks which (repair: the current file at the
   same offset; update: any file with the same bytes), re-hashed before it is used;
3. it is fetched from the first source that delivers it with the right hash
   (failover, and a source that keeps sending wrong bytes is distrusted for the run).

Every byte that reaches the partial file is hashed on its way in; the whole file's
SHA-256 is computed in file order along the way (:class:`~._chunk_io.WholeDigest`:
fetched bytes as their chunks match, local ones read back), checked, and the file
fsynced. Placing it (``os.replace`` over the
final path, fsync of the folder) is the caller's choice: repair places each file at
once, update only once every required file is built. The partial file never grows
past the declared size, and until the swap the final path keeps its old content,
whatever happens (crash, ``ENOSPC``).

Why one layer: repair and update differ only in where local chunks come from and
when files are placed; everything else (the write path of :mod:`._chunk_io`, the
disk-full error, the source failover) is one code path, so a fix or a test of it
covers both.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kensho.errors import (
    DiskSpaceError,
    DownloadError,
    SourceError,
    SourceUnreachableError,
    UnsafePathError,
)
from kensho.events import StorageChunkRejected, StorageDownloadProgress, StorageSourceFailed
from kensho.storage._chunk_io import (
    ChunkMismatch,
    ChunkWriter,
    LocalCopy,
    PartWriter,
    WholeDigest,
    consecutive_runs,
)
from kensho.storage._fs import PathGuard
from kensho.storage._verify import Emit
from kensho.storage.hashing import (
    IOPool,
    chunks_within,
    gather_to_completion,
    run_by_size,
    run_to_completion,
)
from kensho.storage.manifest import FileEntry
from kensho.storage.sources import Source
from kensho.storage.state import StatRecord
from kensho.telemetry import get_logger

__all__ = [
    "MAX_FILES_IN_FLIGHT",
    "SLOT_BYTES",
    "BuildOutcome",
    "Built",
    "FileAssembler",
    "WriterLanes",
    "build_each",
    "bytes_to_write",
    "check_free_space",
    "part_path",
]

_log = get_logger("storage")
_T = TypeVar("_T")
_I = TypeVar("_I")
#: A file this large or larger takes one of a run's ``concurrency`` slots; smaller
#: files are built beside them, this many bytes of them at once (:func:`build_each`)...
SLOT_BYTES = 32 << 20
#: ... up to this many files in flight in all (the HTTP source's thread count).
MAX_FILES_IN_FLIGHT = 16
_DISTRUSTED = "skipped, it sent wrong bytes earlier in this run"


async def build_each(
    items: Sequence[_I], job: Callable[[_I], Awaitable[_T]], size: Callable[[_I], int], limit: int
) -> list[_T]:
    """``await job(item)`` for every file to build: ``limit`` large files at a time,
    small ones beside them (:func:`~.hashing.run_by_size`); results in order.

    The one scheduling rule of repair and update runs: files of :data:`SLOT_BYTES`
    or more keep to ``limit`` at a time, so memory and connections stay bounded as
    before, while small files, up to :data:`SLOT_BYTES` of them together, keep up to
    :data:`MAX_FILES_IN_FLIGHT` requests, fsyncs and renames going meanwhile.
    """
    return await run_by_size(
        items, job, size, limit=limit, slot_bytes=SLOT_BYTES, most=MAX_FILES_IN_FLIGHT
    )


def part_path(tmp_dir: Path, entry: FileEntry) -> Path:
    """The temp file for ``entry``: named by its path, so a resume finds it again."""
    digest = hashlib.sha256(entry.path.encode()).hexdigest()[:32]
    return tmp_dir / f"{digest}.part"


def bytes_to_write(tmp_dir: Path, entries: Iterable[FileEntry]) -> int:
    """Bytes still to write in ``tmp_dir`` to build ``entries``: each whole, minus what
    its partial file already holds (its allocated blocks, at most its size). Blocking.

    The one count of partial bytes, for the repair and the update space checks.
    """
    needed = 0
    for entry in entries:
        try:
            have = min(entry.size, part_path(tmp_dir, entry).stat().st_blocks * 512)
        except OSError:
            have = 0
        needed += entry.size - have
    return needed


def check_free_space(*, what: str, where: str, needed: int, margin: int, free: int) -> None:
    """Refuse a build that does not fit, before any byte of it is written.

    ``what`` names the work (``"repairing 2 file(s) in /store"``), ``where`` the
    place the bytes go, for the message. Repair and update both check here.
    """
    if needed + margin <= free:
        return
    raise DiskSpaceError(
        f"{what} needs {needed} bytes {where}plus a {margin}-byte margin, but only {free} "
        "bytes are free; free some space (or move the store) and run the sync again",
        needed=needed + margin,
        free=free,
    )


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


def _open_part(part: Path, size: int) -> tuple[int, int]:
    """Open (or create) the partial file; return its fd and its size before truncation."""
    part.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(part, flags, 0o644)
    before = os.fstat(fd).st_size
    os.ftruncate(fd, size)
    return fd, before


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


class WriterLanes:
    """Single-thread executors, each lent to one file's build at a time.

    Why: a file's writes and hashes must run in order on one thread (its running
    digests need no lock), but starting a thread per file cost more than a small
    file's fsync; a lane is given back when its build ends and lent to the next
    file. As many lanes exist as files were ever built at once. Used from the event
    loop only.
    """

    def __init__(self) -> None:
        self._idle: list[ThreadPoolExecutor] = []

    @contextlib.contextmanager
    def lend(self) -> Iterator[Executor]:
        """A lane for one build; back to the idle ones when the block ends.

        The caller's jobs on it are over by then (they run to completion).
        """
        lane = self._idle.pop() if self._idle else _new_lane()
        try:
            yield lane
        finally:
            self._idle.append(lane)

    def close(self) -> None:
        """Stop the idle lanes' threads (they end as soon as they see it)."""
        lanes, self._idle = self._idle, []
        for lane in lanes:
            lane.shutdown(wait=False)


def _new_lane() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="kensho-write")


@dataclass
class FileAssembler:
    """Builds files of one store from local chunks and an ordered list of sources.

    One per run: a source it distrusts (wrong bytes) stays distrusted for every
    later file of the run. Its methods hold no per-file state, so files can be
    built concurrently. Every write and every swap goes through ``writer``.
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
    writer: PartWriter = field(default_factory=PartWriter)
    #: Sources that sent bytes contradicting the manifest ``mismatch_retries`` times:
    #: skipped for every later file of this run (a lying mirror is not asked again).
    distrusted: set[str] = field(default_factory=set)
    #: Chunks rejected per source during this run.
    rejected: dict[str, int] = field(default_factory=dict)
    #: The writer threads, one per file being built (see :class:`WriterLanes`).
    lanes: WriterLanes = field(default_factory=WriterLanes, repr=False)
    #: Checks this store's paths, remembering the folders it verified (one per run).
    guard: PathGuard = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # One guard per run: each parent folder is checked once, not once per file.
        self.guard = PathGuard(self.root)

    def close(self) -> None:
        """Stop the idle writer threads (a dropped assembler's end on their own)."""
        self.lanes.close()

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
        with self.lanes.lend() as lane:
            return await self._build_on(lane, entry, local, place, already_there)

    async def _build_on(
        self,
        lane: Executor,
        entry: FileEntry,
        local: LocalCopy | None,
        place: bool,
        already_there: Callable[[Path], Awaitable[bool]] | None,
    ) -> Built:
        """:meth:`build`, every blocking step of this file on its own ``lane``."""
        part = part_path(self.tmp_dir, entry)
        try:
            dest = await run_to_completion(lane, self.guard.resolve, entry.path)
            if already_there is not None and await already_there(dest):
                await asyncio.to_thread(part.unlink, missing_ok=True)
                return Built(part, dest, BuildOutcome(True), entry.size, in_place=True)
            fd, before = await run_to_completion(lane, _open_part, part, entry.size)
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
            pending = set(todo)
            final = (i for i in range(len(entry.chunks)) if i not in pending)
            whole = WholeDigest(fd, entry.chunks, final)
            outcome = await self._fetch(entry, fd, todo, whole, lane)
            if outcome.ok:
                outcome = await self._check_whole(entry, fd, part, outcome, whole)
            if outcome.ok:
                outcome.record = await run_to_completion(
                    lane, self._sync_and_place, fd, part, dest if place else None
                )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full(entry, part, dest) from exc
            moving = f" or move it to {dest}" if place else ""
            reason = f"cannot write {part}{moving}: {exc.strerror or exc}"
            return Built(part, dest, BuildOutcome(False, reason))
        finally:
            os.close(fd)
        return Built(part, dest, outcome, reused)

    def _sync_and_place(self, fd: int, part: Path, dest: Path | None) -> StatRecord | None:
        """fsync the built file, then swap it in at ``dest`` (if given); one thread job.

        Why one job: for a small file the hops between the event loop and a thread
        cost more than the fsync and the rename themselves. The order is the
        guarantee: the file's bytes are durable before its name moves over ``dest``.
        """
        os.fsync(fd)
        return None if dest is None else self.writer.place(part, dest)

    async def place(self, part: Path, dest: Path) -> StatRecord:
        """Swap a built partial file in at ``dest``; its new record."""
        return await run_to_completion(None, self.writer.place, part, dest)

    async def _check_whole(
        self, entry: FileEntry, fd: int, part: Path, outcome: BuildOutcome, whole: WholeDigest
    ) -> BuildOutcome:
        """``outcome``, or a failure if the built file's whole SHA-256 is not ``entry``'s.

        Why on top of the chunk hashes: matching chunks prove the file against the
        chunk list, but a manifest whose chunk list and ``sha256`` disagree cannot be
        told at parse time without the data (and a new release may come from another
        chunker). Such a manifest is refused instead of placed, and the partial file,
        proven wrong, is deleted. When the digest must read bytes back (local or
        resumed chunks), the file is fsynced meanwhile, so the disk works while the
        CPU hashes (the fsync before placing then finds nothing left to write); a
        file whose every byte was hashed on the way in costs no thread job here.
        """
        if whole.complete:
            digest = whole.hexdigest()
        else:
            _, digest = await gather_to_completion(
                [self.io.run(os.fsync, fd), self.io.run(whole.hexdigest)]
            )
        if digest == entry.sha256:
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
            return await self.io.run(local.copy, dest, fd, batch, self.writer)

        missed = await self.io.in_batches(entry.chunks, candidates, job)
        if missed and local.note:
            _log.warning(local.note, path=entry.path, chunks=len(missed))
        return sorted([i for i in todo if i not in held] + missed)

    async def _fetch(
        self, entry: FileEntry, fd: int, todo: list[int], whole: WholeDigest, pool: Executor
    ) -> BuildOutcome:
        """Fetch the chunks of ``todo``, source after source (failover).

        ``pool`` is the file's lane: one writer thread, so its runs are written and
        hashed one after the other, in order.
        """
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
                entry, fd, source, todo, done=done, on_chunks=on_chunks, pool=pool, whole=whole
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
        whole: WholeDigest,
    ) -> SourceError | None:
        """Fetch what is left of ``todo`` from one source; the error that stopped it."""
        mismatches = 0
        chunks = entry.chunks
        while remaining := [i for i in todo if not done[i]]:
            try:
                for run in consecutive_runs(remaining):
                    start = chunks[run.start].offset
                    length = chunks[run[-1]].end - start
                    writer = ChunkWriter(
                        fd, chunks, run, on_chunks, pool=pool, writer=self.writer, whole=whole
                    )
                    try:
                        await source.fetch(entry.path, start, length, entry.size, writer)
                    finally:
                        await writer.drain()
                    if done.find(0, run.start, run.stop) != -1:
                        raise DownloadError("the source delivered fewer bytes than asked for")
            except ChunkMismatch as exc:
                mismatches += 1
                self.rejected[source.name] = self.rejected.get(source.name, 0) + 1
                self.emit(
                    StorageChunkRejected(
                        path=entry.path, source=source.name, chunk=exc.index, attempt=mismatches
                    )
                )
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
