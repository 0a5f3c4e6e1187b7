"""Parallel SHA-256 of files and byte ranges, off the event loop.

Why chunk-level jobs: a file's chunks are independent, so one 10 GB model hashes on
every core instead of one. ``hashlib`` releases the GIL while it digests buffers
larger than 2 KiB, so plain threads scale; no process pool, no pickling. Each job
reads with ``os.preadv`` into a per-thread 1 MiB buffer, so memory stays flat however
large the file is (the seed read whole files into memory to hash them).

Why batches: one thread job, future and task per chunk costs tens of microseconds,
which a 4 MiB chunk hides and a 64-byte chunk does not (640,000 one-byte chunks took
100 s and 3.9 GiB to verify). Adjacent chunks are therefore hashed in batches of at
most :data:`BATCH_BYTES` and :data:`BATCH_CHUNKS`: one read, one job, one progress
step per batch; and at most a few jobs per pool thread are in flight at once
(:func:`run_bounded`), so the number of tasks does not grow with the chunk count.

Files are opened with ``O_NOFOLLOW``: a symlink planted at a final path is reported,
never followed (the manager decides what to do with it).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kensho.storage.manifest import Chunk

__all__ = [
    "BATCH_BYTES",
    "BATCH_CHUNKS",
    "BUFFER_SIZE",
    "FileDigest",
    "Hasher",
    "IOPool",
    "ProgressCallback",
    "chunk_batches",
    "chunks_within",
    "gather_to_completion",
    "mismatched_chunks",
    "mismatches_in",
    "read_into",
    "run_bounded",
    "run_by_size",
    "sha256_range",
    "thread_buffer",
]

BUFFER_SIZE = 1 << 20
#: A batch of adjacent chunks is read at once into the thread's buffer, so it holds
#: at most that many bytes (a larger chunk is a batch of its own, hashed streaming).
BATCH_BYTES = BUFFER_SIZE
#: ... and at most this many chunks, so tiny chunks still spread over every thread.
BATCH_CHUNKS = 4096
#: Jobs in flight per pool thread: enough to keep every thread busy, few enough that
#: a million chunks never means a million tasks.
_JOBS_PER_WORKER = 2
#: Called from a worker thread with the number of bytes just hashed.
ProgressCallback = Callable[[int], None]

_local = threading.local()
_T = TypeVar("_T")


def thread_buffer() -> memoryview:
    """This thread's reusable :data:`BUFFER_SIZE`-byte buffer (one per pool thread)."""
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None:
        buf = memoryview(bytearray(BUFFER_SIZE))
        _local.buf = buf
    return buf


def _open_nofollow(path: str | Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))


def sha256_range(
    path: str | Path, offset: int, size: int, progress: ProgressCallback | None = None
) -> str | None:
    """SHA-256 of ``size`` bytes at ``offset``; ``None`` if the file ends before that.

    Blocking; runs in a worker thread. Raises ``OSError`` (``ELOOP`` for a symlink).
    """
    fd = _open_nofollow(path)
    try:
        return _hash_fd(fd, offset, size, progress)
    finally:
        os.close(fd)


def _hash_fd(fd: int, offset: int, size: int, progress: ProgressCallback | None) -> str | None:
    digest = hashlib.sha256()
    buf = thread_buffer()
    pos, end = offset, offset + size
    while pos < end:
        want = min(BUFFER_SIZE, end - pos)
        n = os.preadv(fd, [buf[:want]], pos)
        if n == 0:
            return None
        digest.update(buf[:n])
        pos += n
        if progress is not None:
            progress(n)
    return digest.hexdigest()


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of ``fd``; the bytes read (fewer only at end of file)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def mismatches_in(view: memoryview, start: int, chunks: Sequence[Chunk], batch: range) -> list[int]:
    """Indices of ``batch`` whose bytes in ``view`` do not hash to the manifest value.

    ``view`` holds the file's bytes from offset ``start``; a chunk that does not end
    inside ``view`` (the file was shorter) does not match either.
    """
    bad: list[int] = []
    limit = len(view)
    sha256 = hashlib.sha256
    for i in batch:
        chunk = chunks[i]
        lo = chunk.offset - start
        hi = lo + chunk.size
        if hi > limit or sha256(view[lo:hi]).hexdigest() != chunk.sha256:
            bad.append(i)
    return bad


def mismatched_chunks(path: str | Path, chunks: Sequence[Chunk], batch: range) -> list[int]:
    """Indices of ``batch`` (adjacent chunks) that do not match in the file at ``path``.

    Blocking; one open and one read for the whole batch. Raises ``OSError``.
    """
    fd = _open_nofollow(path)
    try:
        start = chunks[batch[0]].offset
        span = chunks[batch[-1]].end - start
        if span > BATCH_BYTES:  # a single large chunk: hashed streaming
            digest = _hash_fd(fd, start, span, None)
            return [] if digest == chunks[batch[0]].sha256 else [batch[0]]
        view = thread_buffer()[:span]
        got = read_into(fd, view, start)
        return mismatches_in(view[:got], start, chunks, batch)
    finally:
        os.close(fd)


def chunks_within(chunks: Sequence[Chunk], size: int) -> int:
    """How many leading chunks end within ``size`` bytes (chunks tile in order)."""
    return bisect.bisect_right(chunks, size, key=lambda c: c.end)


def chunk_batches(chunks: Sequence[Chunk], indices: Iterable[int]) -> list[range]:
    """Split sorted chunk ``indices`` into batches of adjacent chunks, one job each.

    A batch is consecutive indices, at most :data:`BATCH_CHUNKS` of them and at most
    :data:`BATCH_BYTES` bytes, unless a single chunk is larger on its own.
    """
    batches: list[range] = []
    lo = hi = -1
    size = 0
    for i in indices:
        n = chunks[i].size
        if i == hi and hi - lo < BATCH_CHUNKS and size + n <= BATCH_BYTES:
            hi += 1
            size += n
            continue
        if hi > lo:
            batches.append(range(lo, hi))
        lo, hi, size = i, i + 1, n
    if hi > lo:
        batches.append(range(lo, hi))
    return batches


def _sha256_whole(path: Path, progress: ProgressCallback | None) -> tuple[int, str]:
    fd = _open_nofollow(path)
    try:
        size = os.fstat(fd).st_size
        digest = _hash_fd(fd, 0, size, progress)
        if digest is None:
            raise OSError(f"{path} shrank while it was being hashed")
        return size, digest
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class FileDigest:
    """What :meth:`IOPool.digest_file` learned about one file."""

    size: int
    sha256: str
    chunks: tuple[Chunk, ...]


async def run_to_completion(pool: Executor | None, func: Callable[..., _T], *args: object) -> _T:
    """Run ``func(*args)`` in a thread; if cancelled, wait for the thread to finish first.

    A thread cannot be stopped. If cancellation returned at once, the caller's
    ``finally`` would close the file descriptor the thread is still writing to, and
    the process may hand that number to another file a moment later: model bytes
    written into the state database. So cancellation is delivered only once the job
    is over (a chunk copy or an fsync: milliseconds).
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(pool, func, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


async def gather_to_completion(jobs: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await every job, results in order; on cancellation, wait for all of them.

    ``asyncio.gather`` propagates a cancellation as soon as its first child is
    cancelled, while the others may still be writing through a file descriptor; a
    task group only returns once every child is over.
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(job)) for job in jobs]
    except BaseExceptionGroup as failed:
        # Callers handle one error, as with gather; its own cause is kept (an
        # ``ENOSPC`` behind a ``DiskSpaceError``), not the group's.
        first = failed.exceptions[0]
        raise first from first.__cause__
    return [task.result() for task in tasks]


async def _awaited(job: Awaitable[_T]) -> _T:
    return await job


_I = TypeVar("_I")


async def run_bounded(
    items: Sequence[_I], job: Callable[[_I], Awaitable[_T]], limit: int
) -> list[_T]:
    """``await job(item)`` for every item, at most ``limit`` at a time; results in order.

    Why not :func:`gather_to_completion` over every item: a task per item is what
    made a million tiny chunks cost gigabytes. Here ``limit`` workers pull items from
    one iterator. Errors and cancellation behave as in :func:`gather_to_completion`
    (every running job ends first).
    """
    slots: dict[int, _T] = {}
    feed: Iterator[tuple[int, _I]] = iter(enumerate(items))

    async def worker() -> None:
        for k, item in feed:
            slots[k] = await job(item)

    await gather_to_completion(worker() for _ in range(min(limit, len(items))))
    return [slots[k] for k in range(len(items))]


class _ByteBudget:
    """Bytes (or items) that jobs may hold at once, granted in the order asked for."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._turn = asyncio.Lock()  # FIFO: a large request is not overtaken for ever
        self._freed = asyncio.Event()

    async def take(self, n: int) -> None:
        async with self._turn:  # only the holder waits on _freed
            while self.free < n:
                self._freed.clear()
                await self._freed.wait()
            self.free -= n

    def give(self, n: int) -> None:
        self.free += n
        self._freed.set()


async def run_by_size(
    items: Sequence[_I],
    job: Callable[[_I], Awaitable[_T]],
    size: Callable[[_I], int],
    *,
    limit: int,
    slot_bytes: int,
    most: int,
) -> list[_T]:
    """:func:`run_bounded` with large and small items bounded apart, small ones by bytes.

    Items of ``slot_bytes`` or more run ``limit`` at a time, as with
    ``run_bounded(items, job, limit)``; smaller ones run beside them, as many as
    fit in ``slot_bytes`` together, up to ``most`` items in flight in all. Why:
    building a small file is mostly waiting (a request, an fsync, a rename, a
    folder fsync) and CPU per file, a large one mostly disk and hashing; two at a
    time, or small files only once the large ones are done, left one of them idle
    while the other worked.

    Until the first job has returned, only ``limit`` items start: a run whose
    sources are slow or failing learns it from ``limit`` requests, as before, not
    from ``most`` (each source is judged, and abandoned if it must be, by the time
    a job returns). Items of each kind start in order. Errors and cancellation
    behave as in :func:`gather_to_completion`.
    """
    large, small = _ByteBudget(max(1, limit)), _ByteBudget(slot_bytes)
    admission = asyncio.Lock()  # FIFO: items pass the warm-up gate in order
    returned = asyncio.Event()
    started = 0

    async def weighed(item: _I) -> _T:
        nonlocal started
        async with admission:
            if started >= limit and not returned.is_set():
                await returned.wait()
            started += 1
        n = size(item)
        budget, weight = (large, 1) if n >= slot_bytes else (small, max(n, 1))
        await budget.take(weight)
        try:
            result = await job(item)
        finally:
            budget.give(weight)
        returned.set()
        return result

    return await run_bounded(items, weighed, max(limit, most))


class IOPool:
    """A thread pool sized to the machine for a store's blocking file work.

    Not only hashing: chunk copies, fsyncs and whole-file checks run here too, so
    they share one bound on the threads touching the disk.

    Use as an async context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or min(32, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kensho-hash")

    async def __aenter__(self) -> IOPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads (waits for running jobs)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, func: Callable[..., _T], *args: object) -> _T:
        """Run a blocking ``func(*args)`` on the hash pool (see :func:`run_to_completion`)."""
        return await run_to_completion(self._pool, func, *args)

    async def mismatched(
        self,
        path: str | Path,
        chunks: Sequence[Chunk],
        indices: Iterable[int],
        done: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Indices among sorted ``indices`` whose chunk does not hash right in ``path``.

        A chunk past the end of the file does not match. Adjacent chunks are hashed in
        batches (see the module docstring); ``done(nbytes)`` is called on the event
        loop after each batch. ``OSError`` propagates.
        """

        async def one(batch: range) -> list[int]:
            bad = await self.run(mismatched_chunks, path, chunks, batch)
            if done is not None:
                done(chunks[batch[-1]].end - chunks[batch[0]].offset)
            return bad

        return await self.in_batches(chunks, indices, one)

    async def in_batches(
        self,
        chunks: Sequence[Chunk],
        indices: Iterable[int],
        job: Callable[[range], Awaitable[list[int]]],
    ) -> list[int]:
        """Run ``job`` on each batch of ``indices`` (bounded); the indices it returns, sorted."""
        batches = chunk_batches(chunks, indices)
        found = await run_bounded(batches, job, self.workers * _JOBS_PER_WORKER)
        return [i for part in found for i in part]

    async def hash_ranges(
        self,
        path: Path,
        ranges: Sequence[tuple[int, int]],
        progress: ProgressCallback | None = None,
    ) -> list[str | None]:
        """SHA-256 of each ``(offset, size)`` range of ``path``, all in parallel.

        ``None`` marks a range past the end of the file. ``OSError`` propagates.
        """
        jobs = [self.run(sha256_range, path, off, size, progress) for off, size in ranges]
        return list(await asyncio.gather(*jobs))

    async def digest_file(
        self, path: Path, chunk_size: int, progress: ProgressCallback | None = None
    ) -> FileDigest:
        """Whole-file SHA-256 plus fixed-size chunk hashes, for building manifests.

        The whole-file hash is sequential by nature; it runs in one thread while the
        chunk hashes run in the others (a second read comes from the page cache).
        """
        size = (await self.run(os.stat, path)).st_size
        ranges = [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]
        return await self.digest_ranges(path, size, ranges, progress)

    async def digest_ranges(
        self,
        path: Path,
        size: int,
        ranges: Sequence[tuple[int, int]],
        progress: ProgressCallback | None = None,
    ) -> FileDigest:
        """Whole-file SHA-256 plus the hash of each ``(offset, size)`` range tiling it.

        The ranges come from any chunker (fixed-size, content-defined); ``size`` is
        the file size they were cut from, checked again while hashing.
        """
        (whole_size, whole), hashes = await asyncio.gather(
            self.run(_sha256_whole, path, progress), self.hash_ranges(path, ranges)
        )
        if whole_size != size or any(h is None for h in hashes):
            raise OSError(f"{path} changed size while it was being hashed")
        chunks = tuple(
            Chunk(off, n, h) for (off, n), h in zip(ranges, hashes, strict=True) if h is not None
        )
        return FileDigest(size, whole, chunks)


#: The former name of :class:`IOPool`, kept for existing callers.
Hasher = IOPool
