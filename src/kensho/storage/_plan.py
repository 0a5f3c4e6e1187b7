"""Delta-update planning: which chunks of each new file are already on disk.

The rule (docs/manifest.md, "Delta updates"): for every chunk of a target file, reuse
a local chunk with the same SHA-256 if one exists anywhere in the store, else fetch
its byte range. "Anywhere" means any file of the current trusted manifest, at any
offset: the old version of the same file, a sibling shard, a copy under another name.
The manifest's chunk lists say where each hash lives, so planning reads no file
content; the bytes are re-hashed when they are copied (:mod:`._update`), and a chunk
whose local copy turns out bad is fetched instead.

Planning is pure bookkeeping over two manifests plus one ``lstat`` per file, so a
dry run is instant even for a store of hundreds of GB.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kensho.storage._chunk_io import Donor, consecutive_runs
from kensho.storage._fs import PathGuard, UnsafePathError
from kensho.storage._placement import Placement, check_placement
from kensho.storage.manifest import FileEntry, Manifest
from kensho.storage.state import StatRecord

__all__ = ["Donor", "FilePlan", "UpdatePlan", "plan_update"]

#: Local places remembered per chunk hash, and tried per chunk (best first).
_DONORS = 4


@dataclass(frozen=True, slots=True)
class FilePlan:
    """How one file of the new manifest gets built.

    ``donors`` maps a chunk index to the local places that should hold its bytes
    (best first: the same path before other files); ``fetch`` lists the indices no
    local file holds. ``maybe_placed``: the final path holds a regular file of the
    new size that no fresh record vouches for as other content, so it may already be
    the new file (a run killed between its swap and its record); the updater hashes
    it before building anything.
    """

    entry: FileEntry
    previous: FileEntry | None
    donors: Mapping[int, tuple[Donor, ...]]
    fetch: tuple[int, ...]
    maybe_placed: bool = False

    @property
    def action(self) -> str:
        return "added" if self.previous is None else "changed"

    @property
    def bytes_to_fetch(self) -> int:
        return sum(self.entry.chunks[i].size for i in self.fetch)

    @property
    def bytes_reused(self) -> int:
        return self.entry.size - self.bytes_to_fetch

    @property
    def requests(self) -> int:
        """Byte-range requests needed: adjacent chunks to fetch are merged into one."""
        return len(consecutive_runs(self.fetch))


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    """Every file that changes between two manifests, and what stays or goes."""

    current: Manifest
    target: Manifest
    files: tuple[FilePlan, ...]
    unchanged: tuple[str, ...]
    removed: tuple[str, ...]
    done: tuple[str, ...] = field(default=())  # already at the new version (a resumed run)
    placement: Placement = field(default_factory=Placement)  # obstacles, refusals

    @property
    def bytes_to_fetch(self) -> int:
        return sum(f.bytes_to_fetch for f in self.files)

    @property
    def bytes_reused(self) -> int:
        return sum(f.bytes_reused for f in self.files)

    @property
    def bytes_to_write(self) -> int:
        """Bytes assembled in ``.kensho/tmp``: every planned file, whole."""
        return sum(f.entry.size for f in self.files)


def _present(root: Path, guard: PathGuard, entry: FileEntry) -> os.stat_result | None:
    """The stat of ``entry``'s file if it is a regular file of the declared size."""
    try:
        guard.check(entry.path)
        st = os.lstat(root / entry.path)
    except (OSError, UnsafePathError):
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_size == entry.size else None


def spelled_as_on_disk(
    root: Path, path: str, listings: dict[Path, frozenset[str]] | None = None
) -> bool:
    """Whether the folder holding ``path`` lists its name exactly as written.

    Why: on a case- or normalisation-folding file system (APFS, NTFS) ``Model.bin``
    answers for ``model.bin``; a file found that way is the *old* entry under its
    old spelling (the placement check deletes it as a dropped file), so it must not
    be taken for the new file already in place. ``listings`` caches each folder's
    names for one plan (one listing per folder, however many files it holds).
    """
    parent, _, name = path.rpartition("/")
    folder = root / parent if parent else root
    if listings is None:
        listings = {}
    if folder not in listings:
        try:
            listings[folder] = frozenset(p.name for p in folder.iterdir())
        except OSError:
            listings[folder] = frozenset()
    return name in listings[folder]


def plan_update(
    root: Path,
    current: Manifest,
    target: Manifest,
    records: Mapping[str, tuple[str, StatRecord]],
) -> UpdatePlan:
    """Plan the update of the store at ``root`` from ``current`` to ``target``.

    Blocking (one ``lstat`` per file); run it in a thread. ``records`` are the
    state database's verified records: a file whose fresh record already matches
    its new hash was finished by an earlier, interrupted run and is left alone.
    Whether every changed file can be placed is checked too (:mod:`._placement`):
    ``plan.placement.problems`` lists the files that cannot be, and the updater
    refuses to start then.
    """
    guard = PathGuard(root)
    index: dict[tuple[str, int], list[Donor]] = {}
    offered: dict[str, FileEntry] = {}

    def offer(entry: FileEntry) -> None:
        offered[entry.path] = entry
        for chunk in entry.chunks:
            places = index.setdefault((chunk.sha256, chunk.size), [])
            if len(places) < _DONORS:  # a hash repeated a million times keeps 4 places
                places.append(Donor(entry.path, chunk.offset))

    done: list[str] = []
    for entry in current.files:
        new = target.file(entry.path)
        st = _present(root, guard, entry)
        if st is None:
            continue
        record = records.get(entry.path)
        if (
            new is not None
            and new.sha256 != entry.sha256
            and record is not None
            and record[0] == new.sha256
        ):
            continue  # already replaced by its new version: offered below instead
        offer(entry)
    changed: list[tuple[FileEntry, bool]] = []
    listings: dict[Path, frozenset[str]] = {}
    unchanged: list[str] = []
    for entry in target.files:
        old = current.file(entry.path)
        if old is not None and old.sha256 == entry.sha256 and old.size == entry.size:
            unchanged.append(entry.path)
            continue
        record = records.get(entry.path)
        st = _present(root, guard, entry)
        fresh = st is not None and record is not None and record[1] == StatRecord.of(st)
        if fresh and record is not None and record[0] == entry.sha256:
            done.append(entry.path)
            offer(entry)
            continue
        maybe_placed = (
            st is not None and not fresh and spelled_as_on_disk(root, entry.path, listings)
        )
        changed.append((entry, maybe_placed))
    plans = [
        _plan_file(entry, current.file(entry.path), index, offered.get(entry.path), maybe_placed)
        for entry, maybe_placed in changed
    ]
    removed = tuple(f.path for f in current.files if target.file(f.path) is None)
    placement = check_placement(root, current, target, [e for e, _ in changed], records)
    return UpdatePlan(
        current, target, tuple(plans), tuple(unchanged), removed, tuple(done), placement
    )


def _plan_file(
    entry: FileEntry,
    previous: FileEntry | None,
    index: Mapping[tuple[str, int], list[Donor]],
    local: FileEntry | None,
    maybe_placed: bool,
) -> FilePlan:
    """Donors for each chunk of ``entry``: the same path first, then other files.

    ``local`` is the file now at ``entry.path`` if it was offered as a donor. Each
    chunk gets at most :data:`_DONORS` places, found by dictionary lookups: the
    cost follows the chunk count, however often a hash repeats.
    """
    same: dict[tuple[str, int], list[int]] = {}
    for chunk in local.chunks if local is not None else ():
        offsets = same.setdefault((chunk.sha256, chunk.size), [])
        if len(offsets) < _DONORS:
            offsets.append(chunk.offset)
    donors: dict[int, tuple[Donor, ...]] = {}
    fetch: list[int] = []
    for i, chunk in enumerate(entry.chunks):
        key = (chunk.sha256, chunk.size)
        # The same file first (likely cached, same disk region), then the others.
        places = [Donor(entry.path, off) for off in same.get(key, ())]
        places += [d for d in index.get(key, ()) if d.path != entry.path]
        if places:
            donors[i] = tuple(places[:_DONORS])
        else:
            fetch.append(i)
    return FilePlan(entry, previous, donors, tuple(fetch), maybe_placed)
