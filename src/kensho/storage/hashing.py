"""Parallel SHA-256 of files and byte ranges, off the event loop.

Why chunk-level jobs: a file's chunks are independent, so one 10 GB model hashes on
every core instead of one. ``hashlib`` releases the GIL while it digests buffers
larger than 2 KiB, so plain threads scale; no process pool, no pickling. Each job
reads with ``os.preadv`` into a per-thread 1 MiB buffer, so memory stays flat however
large the file is (the seed read whole files into memory to hash them).

Files are opened with ``O_NOFOLLOW``: a symlink planted at a final path is reported,
never followed (the manager decides what to do with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kensho.storage.manifest import Chunk

__all__ = ["BUFFER_SIZE", "FileDigest", "Hasher", "ProgressCallback", "sha256_range"]

BUFFER_SIZE = 1 << 20
#: Called from a worker thread with the number of bytes just hashed.
ProgressCallback = Callable[[int], None]

_local = threading.local()
_T = TypeVar("_T")


def _buffer() -> memoryview:
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
    buf = _buffer()
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
    """What :meth:`Hasher.digest_file` learned about one file."""

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


async def run_all(jobs: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await every job, results in order; on cancellation, wait for all of them.

    ``asyncio.gather`` propagates a cancellation as soon as its first child is
    cancelled, while the others may still be writing through a file descriptor; a
    task group only returns once every child is over.
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(job)) for job in jobs]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None  # callers handle one error, as with gather
    return [task.result() for task in tasks]


async def _awaited(job: Awaitable[_T]) -> _T:
    return await job


class Hasher:
    """A thread pool sized to the machine, shared by every hash job of a store.

    Use as an async context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or min(32, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kensho-hash")

    async def __aenter__(self) -> Hasher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads (waits for running jobs)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, func: Callable[..., _T], *args: object) -> _T:
        """Run a blocking ``func(*args)`` on the hash pool (see :func:`run_to_completion`)."""
        return await run_to_completion(self._pool, func, *args)

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
