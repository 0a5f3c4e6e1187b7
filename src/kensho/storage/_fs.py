"""File-system helpers: paths that stay inside the root, durable atomic writes.

Why not just ``root / path``: a manifest path is validated text, but the disk may hold
a symlink planted at ``root/models`` pointing at ``/etc``. Every path Kensho reads or
writes goes through :func:`resolve_inside`, which refuses a path whose existing parent
folders include a symbolic link, wherever it leads. A link leading outside the root
would make Kensho write outside it; a link inside the root (``models -> other``) would
make two manifest paths name one file, so a sync writes one through the other, says
ready, and the next full verify fails. (A local attacker racing us between check and
use is out of scope; the final open uses ``O_NOFOLLOW`` regardless.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from kensho.errors import UnsafePathError

__all__ = [
    "FOLDER_SYNC",
    "FolderSync",
    "PathGuard",
    "UnsafePathError",
    "atomic_write_bytes",
    "fsync_dir",
    "resolve_inside",
    "start_writeback",
    "symlink_problem",
]

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages, do not wait


class PathGuard:
    """Resolves manifest paths under one root, checking each parent folder once.

    Why a class: a store of 10,000 files in 20 folders needs 20 checks, not 10,000
    ``realpath`` calls (they dominated the warm verify before this cache).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._checked: dict[str, str | None] = {}  # parent folder -> problem, or None

    def resolve(self, rel: str) -> Path:
        """``root / rel`` after :meth:`check`."""
        self.check(rel)
        return self.root / rel

    def check(self, rel: str) -> None:
        """Check that no existing parent folder of ``rel`` leaves the root.

        The final component may be a symlink (the caller reports it and replaces the
        link itself, never its target); a parent that is a symlink is refused, even
        one resolving inside the root. Raises :class:`UnsafePathError`.
        """
        parent = rel.rpartition("/")[0]
        if not parent:
            return
        if parent not in self._checked:
            problem = None
            current = self.root
            for part in parent.split("/"):
                current = current / part
                problem = self._problem(current)
                if problem is not None:
                    break
            self._checked[parent] = problem
        problem = self._checked[parent]
        if problem is not None and problem != "absent":
            raise UnsafePathError(problem)

    def _problem(self, folder: Path) -> str | None:
        try:
            mode = folder.lstat().st_mode
        except FileNotFoundError:
            return "absent"
        except OSError as exc:  # permission denied, name too long, a symlink loop
            return f"{folder} cannot be examined: {exc.strerror or exc}"
        if stat.S_ISLNK(mode):
            return symlink_problem(folder, self.root)
        if not folder.is_dir():
            return f"{folder} is a file where the manifest needs a folder; move it away"
        return None


def symlink_problem(folder: Path, root: Path) -> str:
    """Why Kensho refuses to use the symbolic link ``folder`` as a folder of the store."""
    try:
        leads_out = not folder.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a loop: it leads nowhere usable
        leads_out = True
    if leads_out:
        return (
            f"{folder} is a symbolic link leading outside the store root {root}; "
            "Kensho will not read or write through it (remove the link)"
        )
    return (
        f"{folder} is a symbolic link to {folder.resolve()}, inside the store: two "
        "manifest paths could then name one file, so Kensho will not read or write "
        "through it (replace the link by a real folder)"
    )


def resolve_inside(root: Path, rel: str) -> Path:
    """One-off :meth:`PathGuard.resolve` (re-checks every parent)."""
    return PathGuard(root).resolve(rel)


def fsync_dir(path: Path) -> None:
    """Make a rename or creation in ``path`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


class FolderSync:
    """Folder fsyncs shared by the renames that happened before them (group commit).

    Why: a sync of many small files placed each one with a rename and an fsync of
    its folder; with files built side by side, a folder fsync (a journal commit and
    a cache flush on ext4) ran for every file, while one fsync makes durable every
    rename done in that folder before it *started*. :meth:`sync` returns only after
    such an fsync: one already under way when the caller came may predate its
    rename, so the caller waits for it to end and then starts (or joins) the next
    one, which covers every caller that came meanwhile. Each rename is therefore
    as durable when ``sync`` returns as with its own fsync, for every file: the
    guarantee does not depend on the batch (nothing is "placed" and recorded before
    its folder fsync returned), only the number of fsyncs does. Thread-safe.
    """

    def __init__(self, fsync: Callable[[Path], None] | None = None) -> None:
        self._fsync = fsync or fsync_dir
        self._cond = threading.Condition()
        self._asked: dict[str, int] = {}  # folder -> tickets handed out
        self._done: dict[str, int] = {}  # folder -> tickets covered by a finished fsync
        self._running: set[str] = set()
        self._calls: dict[str, int] = {}  # folder -> calls not returned yet

    def under_way(self, folder: Path) -> int:
        """How many :meth:`sync` calls on ``folder`` have not returned yet."""
        with self._cond:
            return self._calls.get(str(folder), 0)

    def sync(self, folder: Path) -> None:
        """Make every rename done in ``folder`` before this call durable."""
        key = str(folder)
        with self._cond:
            self._calls[key] = self._calls.get(key, 0) + 1
        try:
            self._sync(folder, key)
        finally:
            with self._cond:
                self._calls[key] -= 1

    def _sync(self, folder: Path, key: str) -> None:
        with self._cond:
            ticket = self._asked[key] = self._asked.get(key, 0) + 1
            while key in self._running:  # it may have started before our rename
                self._cond.wait()
            if self._done.get(key, 0) >= ticket:  # one that started after us covered it
                return
            self._running.add(key)
            covered = self._asked[key]  # every caller so far renamed before this fsync
        synced = False
        try:
            self._fsync(folder)
            synced = True
        finally:
            with self._cond:
                self._running.discard(key)
                if synced:  # a failed one covers nobody: the next caller tries again
                    self._done[key] = max(self._done.get(key, 0), covered)
                self._cond.notify_all()


#: The process's folder fsyncs: every store's placements share it.
FOLDER_SYNC = FolderSync()


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), which Python's ``os`` does not expose."""
    if not sys.platform.startswith("linux"):  # pragma: no cover - other systems
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_start_write_out = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk, now.

    Why: a download of a few GB fits in the page cache, so without this the kernel
    writes nothing until the final ``fsync``, which then waits for every byte (about
    as long again as the transfer). Started early, the disk writes while the network
    delivers, and the fsync only waits for the last pieces. It is what git's
    ``core.fsyncMethod=batch`` does (``SYNC_FILE_RANGE_WRITE``: no waiting, no
    durability promise, pages stay cached). Only a hint: where it is unsupported or
    fails, nothing changes, and the ``fsync`` before placing remains what makes the
    file durable.
    """
    if _start_write_out is not None and length > 0:
        _start_write_out(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def atomic_write_bytes(path: Path, data: bytes, *, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix.

    Temp file in ``tmp_dir`` (same file system as ``path``), fsync, ``os.replace``,
    fsync of the folder.
    """
    folder = tmp_dir or path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
