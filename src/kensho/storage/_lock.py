"""One repairer per store root, across processes (``filelock``).

Why a lock only for writers: readers never need one, because files reach their final
path only through ``os.replace``. Two repairers would race on the same partial files
in ``.kensho/tmp`` (the corruption that made huggingface_hub drop resume). ``flock``
does nothing on some network file systems; keep store roots on local disks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from filelock import FileLock, Timeout

from kensho.errors import StoreBusyError

__all__ = ["StoreBusyError", "StoreLock"]


class StoreLock:
    """An async wrapper around a cross-process file lock at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # thread_local=False: acquired in a worker thread, released on the loop thread.
        self._lock = FileLock(path, thread_local=False)

    def try_acquire(self) -> bool:
        """Take the lock at once if it is free; never blocks."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def _acquire_for(self, seconds: float) -> bool:
        try:
            self._lock.acquire(timeout=seconds)
        except Timeout:
            return False
        return True

    async def acquire(self) -> None:
        """Wait for the lock without blocking the event loop.

        Cancellable: a worker thread may still win the lock after the caller was
        cancelled, so a callback hands it back at once.
        """
        while True:
            attempt = asyncio.ensure_future(asyncio.to_thread(self._acquire_for, 0.5))
            try:
                if await asyncio.shield(attempt):
                    return
            except asyncio.CancelledError:
                attempt.add_done_callback(self._release_if_won)
                raise

    def _release_if_won(self, attempt: asyncio.Future[bool]) -> None:
        if not attempt.cancelled() and attempt.exception() is None and attempt.result():
            self._lock.release()

    def busy_error(self, root: Path) -> StoreBusyError:
        return StoreBusyError(
            f"another Kensho process is repairing {root} (lock {self.path}); "
            "wait for it to finish, or run without --no-wait to queue behind it",
            lock_path=self.path,
        )

    def release(self) -> None:
        self._lock.release()
