"""Verdicts of a verification: per file, and for the whole store.

The store's integrity status (ok / degraded / failed) is decided here, once, by
:attr:`VerifyReport.status`; the storage manager, the kernel, the server's health
and readiness endpoints and the metrics all read it from there.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

from kensho.events import StorageFileChecked

__all__ = ["FileReport", "FileStatus", "IntegrityStatus", "VerifyReport"]


class IntegrityStatus(enum.StrEnum):
    """What a verification says about the whole store."""

    OK = "ok"  # every file good
    DEGRADED = "degraded"  # every required file good, an optional one missing or bad
    FAILED = "failed"  # a required file missing or bad: the store must not be served
    UNVERIFIED = "unverified"  # no verification yet (or no store at all)


class FileStatus(enum.StrEnum):
    """What verification found at one path."""

    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"  # right size, some chunks do not match (or not a regular file)
    WRONG_SIZE = "wrong_size"  # longer or shorter than the manifest says
    UNEXPECTED = "unexpected"  # in the root but not in the manifest: reported, never deleted
    UNSAFE = "unsafe"  # reachable only through a symlink leaving the root, or blocked


@dataclass(frozen=True, slots=True)
class FileReport:
    """One file's verdict. ``bad_chunks`` are indices into the manifest's chunk list."""

    path: str
    status: FileStatus
    required: bool
    size: int | None
    expected_size: int | None
    bad_chunks: tuple[int, ...] = ()
    detail: str = ""
    fast: bool = False

    @property
    def needs_repair(self) -> bool:
        return self.status not in {FileStatus.OK, FileStatus.UNEXPECTED}

    def event(self) -> StorageFileChecked:
        return StorageFileChecked(
            path=self.path,
            status=self.status.value,
            required=self.required,
            size=self.size,
            expected_size=self.expected_size,
            bad_chunks=self.bad_chunks,
            detail=self.detail,
            fast=self.fast,
        )


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Every file's verdict, in manifest order, then unexpected files."""

    files: tuple[FileReport, ...]
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every required file is good."""
        return not any(f.required and f.needs_repair for f in self.files)

    @property
    def status(self) -> IntegrityStatus:
        """The store's verdict: failed (a required file bad), degraded (an optional
        one bad) or ok."""
        if not self.ok:
            return IntegrityStatus.FAILED
        return IntegrityStatus.DEGRADED if self.to_repair else IntegrityStatus.OK

    @property
    def to_repair(self) -> tuple[FileReport, ...]:
        return tuple(f for f in self.files if f.needs_repair)

    def counts(self) -> dict[str, int]:
        found = Counter(f.status.value for f in self.files)
        return {s.value: found.get(s.value, 0) for s in FileStatus}

    def get(self, path: str) -> FileReport | None:
        for f in self.files:
            if f.path == path:
                return f
        return None
