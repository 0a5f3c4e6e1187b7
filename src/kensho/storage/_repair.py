"""Repair of one file: rebuild it from its good chunks and from sources, then swap it in.

The build itself (resume, local copy, fetch with failover, checks, placing) is
:mod:`._assemble`'s; what repair adds is where local chunks come from (the current,
damaged file, at the same offsets: only bad chunks are fetched) and that each file
is placed as soon as it is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from kensho.events import StorageFileRepaired
from kensho.storage._assemble import BuildOutcome, FileAssembler, part_path
from kensho.storage._chunk_io import LocalCopy, same_offset_copy
from kensho.storage.manifest import FileEntry
from kensho.storage.report import FileReport, FileStatus

__all__ = ["FileRepairer", "RepairOutcome", "part_path"]

#: The former name of :class:`~._assemble.BuildOutcome` (updates use it too).
RepairOutcome = BuildOutcome


@dataclass
class FileRepairer:
    """Repairs files of one store with a shared :class:`FileAssembler`."""

    assembler: FileAssembler

    async def repair(self, entry: FileEntry, report: FileReport) -> BuildOutcome:
        """Make ``entry`` good at its final path, or say why it could not be."""
        if report.status == FileStatus.UNSAFE:
            return BuildOutcome(False, report.detail or "unsafe path")
        built = await self.assembler.build(entry, local=_local_chunks(entry, report), place=True)
        outcome = built.outcome
        if outcome.ok:
            used = tuple(dict.fromkeys(outcome.sources))
            self.assembler.emit(
                StorageFileRepaired(
                    path=entry.path, fetched=outcome.fetched, reused=built.reused, sources=used
                )
            )
        return outcome


def _local_chunks(entry: FileEntry, report: FileReport) -> LocalCopy | None:
    """The current file's good chunks, when it has any (corrupt or wrong size)."""
    if report.status in {FileStatus.CORRUPT, FileStatus.WRONG_SIZE} and report.size:
        return same_offset_copy(entry.chunks, report.bad_chunks)
    return None
