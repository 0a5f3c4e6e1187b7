"""Can every new file of an update be placed? Decided before the first swap.

An update swaps its files in one by one (``os.replace``), so a swap that fails half
way leaves a store that matches neither release. Everything that can make a swap
fail is therefore checked first, for every file to place, while the store is still
wholly on the old release: a folder where the new file goes, a file (or a symbolic
link) where it needs a folder, a folder Kensho may not write in, a folder on another
file system than ``.kensho/tmp`` (``os.replace`` cannot cross file systems), and, on
a file system that folds case or Unicode normalisation, an existing entry spelled
differently that the new name would silently land in.

One obstacle is cleared instead of refused, as ``rsync --delete`` or a package
manager would: an entry made only of files of the *current* release that the new
release drops, each still holding exactly its current-release content. Those are
Kensho's own files, reproducible from the old manifest, and the new release needs
their place (v1 has a folder ``cfg/``, v2 a file ``cfg``). Anything else in the way,
a file the manifest never listed, a managed file that was edited, a link, is the
user's and is refused, naming it; nothing is deleted then.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kensho.errors import IntegrityError
from kensho.storage._fs import fsync_dir, symlink_problem
from kensho.storage.hashing import sha256_range
from kensho.storage.manifest import FileEntry, Manifest
from kensho.storage.state import STATE_DIR, StatRecord
from kensho.telemetry import get_logger

__all__ = ["Placement", "check_placement", "clear_obstacles", "placement_error"]

_log = get_logger("storage")


@dataclass(frozen=True, slots=True)
class Placement:
    """What placing an update's files needs, or why it cannot be done.

    ``files`` and ``folders`` (deepest first) are obstacles made only of dropped
    current-release files, deleted just before the first swap; ``problems`` maps a
    file to place to the reason it cannot be, and makes the update refuse to start.
    """

    files: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    problems: Mapping[str, str] = field(default_factory=dict)


class _Refused(Exception):
    """Internal: one target cannot be placed (the message says why)."""


@dataclass
class _Checker:
    root: Path
    current: Manifest
    target: Manifest
    records: Mapping[str, tuple[str, StatRecord]]
    device: int | None
    names: dict[str, set[str]] = field(default_factory=dict)  # folder -> its entries
    writable: dict[str, str | None] = field(default_factory=dict)  # folder -> problem
    files: dict[str, None] = field(default_factory=dict)  # ordered sets
    folders: dict[str, None] = field(default_factory=dict)

    def place(self, rel: str) -> None:
        """Walk ``rel`` from the root; raise :class:`_Refused` or note obstacles."""
        parts = rel.split("/")
        here = ""
        for depth, name in enumerate(parts):
            spot = f"{here}/{name}" if here else name
            last = depth == len(parts) - 1
            found = self._lstat(spot)
            if found is None:  # absent: the rest is created by the swap
                self._can_write(here)
                return
            spelled = self._spelling(here, name)
            if spelled != name:
                existing = self._join(here, spelled)
                self._clear_or_refuse(
                    existing,
                    f"the file system treats {spot!r} and the existing {existing!r} as one "
                    "name (it folds case or Unicode form); rename or remove it",
                )
                self._can_write(here)
                return
            mode = found.st_mode
            if last:
                if stat.S_ISDIR(mode):
                    self._clear_or_refuse(spot, f"{spot!r} is a folder where the file goes")
                elif not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                    raise _Refused(f"{spot!r} is not a regular file; remove it")
                self._can_write(here)
                return
            if stat.S_ISLNK(mode):
                raise _Refused(symlink_problem(self.root / spot, self.root))
            if not stat.S_ISDIR(mode):
                self._clear_or_refuse(spot, f"{spot!r} is a file where a folder is needed")
                self._can_write(here)
                return
            here = spot

    @staticmethod
    def _join(folder: str, name: str) -> str:
        return f"{folder}/{name}" if folder else name

    def _lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.root / rel)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _Refused(f"{rel!r} cannot be examined: {exc.strerror or exc}") from exc

    def _spelling(self, folder: str, name: str) -> str:
        """How the entry that ``lstat(folder/name)`` found is spelled on disk."""
        if folder not in self.names:
            try:
                self.names[folder] = {p.name for p in (self.root / folder).iterdir()}
            except OSError as exc:
                raise _Refused(f"{folder!r} cannot be listed: {exc.strerror or exc}") from exc
        names = self.names[folder]
        if name in names:
            return name
        key = unicodedata.normalize("NFC", name).casefold()
        for other in sorted(names):
            if unicodedata.normalize("NFC", other).casefold() == key:
                return other
        raise _Refused(f"{self._join(folder, name)!r} resolves to an entry listed under no name")

    def _can_write(self, folder: str) -> None:
        """Refuse if the swap cannot create or rename entries in ``folder``."""
        if folder not in self.writable:
            path = self.root / folder
            problem = None
            try:
                st = path.stat()
            except OSError as exc:
                problem = f"{path} cannot be examined: {exc.strerror or exc}"
            else:
                if not os.access(path, os.W_OK | os.X_OK):
                    problem = f"Kensho may not write in {path} (permission denied)"
                elif self.device is not None and st.st_dev != self.device:
                    problem = (
                        f"{path} is on another file system than {self.root / STATE_DIR}, "
                        "where new files are assembled; a file cannot be moved across "
                        "file systems in one atomic step"
                    )
            self.writable[folder] = problem
        problem = self.writable[folder]
        if problem is not None:
            raise _Refused(problem)

    def _clear_or_refuse(self, rel: str, why: str) -> None:
        """Note ``rel`` for deletion if it holds only dropped files, else refuse."""
        files: list[str] = []
        folders: list[str] = []
        blocker = self._collect(rel, files, folders)
        if blocker is not None:
            raise _Refused(f"{why}; it holds {blocker}, which is not a file Kensho may delete")
        for path in files:
            self.files[path] = None
        for path in folders:
            self.folders[path] = None

    def _collect(self, rel: str, files: list[str], folders: list[str]) -> str | None:
        """Gather ``rel``'s dropped files and folders (deepest first); the first blocker."""
        st = self._lstat(rel)
        if st is None:
            return None
        if stat.S_ISREG(st.st_mode):
            if not self._dropped_intact(rel, st):
                return repr(rel)
            files.append(rel)
            return None
        if not stat.S_ISDIR(st.st_mode):
            return repr(rel)
        self._can_write(rel)
        try:
            names = sorted(p.name for p in (self.root / rel).iterdir())
        except OSError as exc:
            raise _Refused(f"{rel!r} cannot be listed: {exc.strerror or exc}") from exc
        for name in names:
            blocker = self._collect(f"{rel}/{name}", files, folders)
            if blocker is not None:
                return blocker
        folders.append(rel)  # after its content: deepest first
        return None

    def _dropped_intact(self, rel: str, st: os.stat_result) -> bool:
        """Whether ``rel`` is a current-release file the target drops, unedited."""
        entry = self.current.file(rel)
        if entry is None or self.target.file(rel) is not None or st.st_size != entry.size:
            return False
        record = self.records.get(rel)
        if record is not None and record == (entry.sha256, StatRecord.of(st)):
            return True
        try:
            return sha256_range(self.root / rel, 0, entry.size) == entry.sha256
        except OSError:
            return False


def check_placement(
    root: Path,
    current: Manifest,
    target: Manifest,
    entries: Sequence[FileEntry],
    records: Mapping[str, tuple[str, StatRecord]],
) -> Placement:
    """Check that every one of ``entries`` (of ``target``) can be swapped in at ``root``.

    Blocking: one ``lstat`` per path component, one listing per folder visited, and
    a hash of a dropped file in the way only when its stat record cannot vouch for
    it. Reads nothing else and changes nothing.
    """
    device: int | None = None  # no state folder yet: tmp will be on the root's device
    for folder in (root / STATE_DIR / "tmp", root / STATE_DIR):
        try:
            device = folder.stat().st_dev
            break
        except OSError:
            continue
    checker = _Checker(root, current, target, records, device)
    problems: dict[str, str] = {}
    for entry in entries:
        try:
            checker.place(entry.path)
        except _Refused as exc:
            problems[entry.path] = str(exc)
    return Placement(tuple(checker.files), tuple(checker.folders), problems)


def placement_error(
    root: Path, target: Manifest, current: Manifest, problems: Mapping[str, str]
) -> IntegrityError:
    """The error for an update refused before its first swap, naming every path."""
    listing = "; ".join(f"{path}: {why}" for path, why in problems.items())
    return IntegrityError(
        f"the update of {root} to serial {target.serial} was refused before changing "
        f"anything: {len(problems)} file(s) cannot be placed: {listing}. The store still "
        f"holds serial {current.serial}; fix what is named and run the sync again",
        problems=dict(problems),
    )


def clear_obstacles(root: Path, placement: Placement) -> None:
    """Delete the dropped files and folders in the way (right before the first swap).

    An entry that cannot be deleted (changed since the check) is logged and left:
    the swap that needed its place then fails and says so, the others go on.
    """
    for rel in placement.files:
        try:
            (root / rel).unlink(missing_ok=True)
        except OSError as exc:
            _log.warning("cannot delete a dropped file in the way", path=rel, error=str(exc))
    for rel in placement.folders:
        try:
            (root / rel).rmdir()
        except FileNotFoundError:
            continue
        except OSError as exc:
            _log.warning("cannot delete a dropped folder in the way", path=rel, error=str(exc))
            continue
        fsync_dir((root / rel).parent)
