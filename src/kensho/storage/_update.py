"""Delta updates: assemble every changed file in ``.kensho/tmp``, then swap them in.

Before anything, the plan's placement check (:mod:`._placement`) must have found a
place for every file; otherwise the update is refused and nothing is touched. A file
whose final path already holds its new content (a run killed between its swap and
its record) is hashed and kept, not fetched again. For each other file of an
:class:`~kensho.storage._plan.UpdatePlan`, in order of preference per chunk:

1. it is already good in the partial file of an interrupted run (resume);
2. a local file holds the same bytes (same SHA-256, any file, any offset): the bytes
   are read, re-hashed and copied only if they still match;
3. it is fetched by byte range, adjacent chunks merged into one request, with the
   build layer's source failover, retries and per-chunk hash checks (:mod:`._assemble`).

Then the assembled file is hashed whole against the manifest's ``sha256`` and fsynced.
Only when every *required* file has been assembled this way are the files swapped in
(``os.replace``, one rename each), so a failed update leaves the store wholly on the
old version, and each final path holds the old file, usable, until its swap.

Why a whole-file hash on top of the chunk hashes: chunks that all match prove the
file against the manifest's chunk list, but a new manifest may come from another
chunker (content-defined) and the file hash is what a publisher checks; a manifest
whose two disagree is refused instead of placed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kensho.events import (
    Event,
    StorageFileUpdated,
    StorageUpdateFilePlanned,
    StorageUpdatePlanned,
)
from kensho.storage._assemble import (
    BuildOutcome,
    FileAssembler,
    build_each,
    bytes_to_write,
    check_free_space,
)
from kensho.storage._chunk_io import donor_copy
from kensho.storage._fs import PathGuard
from kensho.storage._placement import Placement, clear_obstacles, placement_error
from kensho.storage._plan import FilePlan, UpdatePlan
from kensho.storage.hashing import sha256_range
from kensho.storage.manifest import dump_manifest
from kensho.storage.state import StateStore, StatRecord
from kensho.telemetry import get_logger

__all__ = ["Assembled", "DeltaUpdater", "check_update_space", "plan_events"]

_log = get_logger("storage")


@dataclass(slots=True)
class Assembled:
    """One file built in ``.kensho/tmp``: ready to swap in when ``outcome.ok``.

    ``in_place``: the final path already held the new file (hashed whole), so there
    is nothing to swap, only its record to keep.
    """

    plan: FilePlan
    part: Path
    dest: Path | None
    outcome: BuildOutcome
    reused: int = 0
    in_place: bool = False


def plan_events(plan: UpdatePlan, *, dry_run: bool) -> list[Event]:
    """The events that announce ``plan``: one per file, then the totals."""
    events: list[Event] = []
    for fp in plan.files:
        entry = fp.entry
        events.append(
            StorageUpdateFilePlanned(
                path=entry.path,
                action=fp.action,
                version=entry.version,
                previous_version=fp.previous.version if fp.previous else None,
                changelog=entry.changelog,
                size=entry.size,
                bytes_reused=fp.bytes_reused,
                bytes_to_fetch=fp.bytes_to_fetch,
                requests=fp.requests,
            )
        )
    for path in plan.removed:
        old = plan.current.file(path)
        events.append(
            StorageUpdateFilePlanned(
                path=path,
                action="removed",
                version="",
                previous_version=old.version if old else None,
                changelog="",
                size=old.size if old else 0,
                bytes_reused=0,
                bytes_to_fetch=0,
                requests=0,
            )
        )
    events.append(
        StorageUpdatePlanned(
            from_serial=plan.current.serial,
            to_serial=plan.target.serial,
            version=plan.target.version,
            files=len(plan.files),
            unchanged=len(plan.unchanged) + len(plan.done),
            removed=len(plan.removed),
            bytes_reused=plan.bytes_reused,
            bytes_to_fetch=plan.bytes_to_fetch,
            bytes_to_write=plan.bytes_to_write,
            dry_run=dry_run,
        )
    )
    return events


@dataclass
class DeltaUpdater:
    """Carries out an :class:`UpdatePlan` for one store (under the store lock)."""

    assembler: FileAssembler
    state: StateStore
    concurrency: int = 2  # large files at a time (small ones share: build_each)
    #: Set by :meth:`assemble_all`, carried out by :meth:`swap_all`.
    _placement: Placement = field(default_factory=Placement, init=False)

    async def assemble_all(self, plan: UpdatePlan) -> list[Assembled]:
        """Build every planned file in ``.kensho/tmp``; nothing is swapped yet.

        Refuses first, with an ``IntegrityError`` naming each path, an update whose
        files cannot all be placed (:mod:`._placement`): nothing is fetched or
        changed then, and a journal of this very update (left by an earlier run
        killed among its swaps) is dropped, so boot does not replay it forever.
        """
        if plan.placement.problems:
            await asyncio.to_thread(self._drop_journal_of, plan)
            raise placement_error(
                self.assembler.root, plan.target, plan.current, plan.placement.problems
            )
        self._placement = plan.placement
        guard = self.assembler.guard  # the folders it checked already stay checked
        return await build_each(
            plan.files,
            lambda fp: self.assemble(fp, guard),
            lambda fp: fp.entry.size,
            self.concurrency,
        )

    def _drop_journal_of(self, plan: UpdatePlan) -> None:
        if self.state.load_pending_manifest() == dump_manifest(plan.target):
            self.state.clear_pending_manifest()
            _log.warning(
                "interrupted update dropped: its files cannot be placed",
                serial=plan.target.serial,
                paths=sorted(plan.placement.problems),
            )

    async def assemble(self, fp: FilePlan, guard: PathGuard) -> Assembled:
        """Build one new file in its partial file; see the module docstring."""
        entry = fp.entry
        built = await self.assembler.build(
            entry,
            local=donor_copy(guard, self.assembler.root, entry.chunks, fp.donors),
            place=False,
            already_there=(lambda dest: self._holds_new_file(dest, fp))
            if fp.maybe_placed
            else None,
        )
        return Assembled(fp, built.part, built.dest, built.outcome, built.reused, built.in_place)

    async def _holds_new_file(self, dest: Path, fp: FilePlan) -> bool:
        """Whether ``dest`` already is the new file: hashed whole, unchanged meanwhile.

        Why: a run killed between a file's swap and its record leaves the new file
        in place with no record saying so; fetching it again would cost its size.
        """
        try:
            before = await asyncio.to_thread(dest.lstat)
            whole = await self.assembler.io.run(sha256_range, dest, 0, fp.entry.size)
            after = await asyncio.to_thread(dest.lstat)
        except OSError:
            return False
        return whole == fp.entry.sha256 and StatRecord.of(before) == StatRecord.of(after)

    async def swap_all(self, built: Sequence[Assembled]) -> list[tuple[str, str, StatRecord]]:
        """Move every good assembled file to its final path; return their new records.

        First the obstacles the placement check found (dropped files of the old
        release in the new files' way) are deleted. Each file's verified record is
        kept right after its swap, so a run killed among the swaps finds the files
        already swapped up to date when it resumes (and one killed between a swap
        and its record finds the new file by hashing it, see :meth:`assemble`).
        """
        await asyncio.to_thread(clear_obstacles, self.assembler.root, self._placement)
        records: list[tuple[str, str, StatRecord]] = []
        for item in built:
            if not item.outcome.ok or item.dest is None:
                continue
            entry = item.plan.entry
            started = time.perf_counter()
            try:
                if item.in_place:
                    record = StatRecord.of(await asyncio.to_thread(item.dest.lstat))
                else:
                    record = await self.assembler.place(item.part, item.dest)
            except OSError as exc:
                item.outcome = BuildOutcome(
                    False, f"cannot move {item.part} to {item.dest}: {exc.strerror or exc}"
                )
                continue
            records.append((entry.path, entry.sha256, record))
            self.assembler.emit(
                StorageFileUpdated(
                    path=entry.path,
                    version=entry.version,
                    changelog=entry.changelog,
                    fetched=item.outcome.fetched,
                    reused=item.reused,
                    sources=tuple(dict.fromkeys(item.outcome.sources)),
                    previous_version=item.plan.previous.version if item.plan.previous else None,
                    swap_seconds=round(time.perf_counter() - started, 4),
                )
            )
            await asyncio.to_thread(self.state.put, [records[-1]])
        return records


async def check_update_space(
    root: Path, plan: UpdatePlan, tmp_dir: Path, *, margin: int, free: int
) -> None:
    """Refuse an update whose new files do not fit in ``tmp_dir``, before any byte is
    written. Unchanged files cost nothing; a reused chunk costs its bytes (it is
    copied into the new file) but no download."""
    if not plan.files:
        return
    needed = await asyncio.to_thread(bytes_to_write, tmp_dir, [fp.entry for fp in plan.files])
    check_free_space(
        what=f"updating {len(plan.files)} file(s) in {root} to serial {plan.target.serial}",
        where=f"in {tmp_dir} (the new files are assembled there before they replace the old ones) ",
        needed=needed,
        margin=margin,
        free=free,
    )
