"""Verification: stat every file, trust fresh records, hash the rest in parallel.

A file is good when every chunk hashes to its manifest value: chunks tile the file
exactly (validated) and come from the same manifest as the file hash, so a matching
chunk list proves the content, and chunk hashes parallelise where a whole-file hash
cannot. For a file of the wrong size, the chunks that still fit are hashed too, so a
truncated file is repaired by fetching only its tail.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kensho.events import (
    Event,
    StorageHashProgress,
    StorageVerifyFinished,
    StorageVerifyStarted,
)
from kensho.storage._fs import PathGuard, UnsafePathError
from kensho.storage.hashing import IOPool, chunks_within, run_bounded
from kensho.storage.manifest import RESERVED_DIR, FileEntry, Manifest
from kensho.storage.report import FileReport, FileStatus, VerifyReport
from kensho.storage.state import StateStore, StatRecord

__all__ = ["Emit", "verify_store"]

Emit = Callable[[Event], None]


@dataclass(slots=True)
class _Scan:
    entry: FileEntry
    path: str
    stat: os.stat_result | None
    report: FileReport | None  # decided without hashing


def _scan(
    root: Path,
    manifest: Manifest,
    records: dict[str, tuple[str, StatRecord]],
    full: bool,
) -> list[_Scan]:
    scans: list[_Scan] = []
    guard = PathGuard(root)
    base = str(root)
    for entry in manifest.files:

        def verdict(
            status: FileStatus,
            size: int | None,
            detail: str = "",
            *,
            e: FileEntry = entry,
            fast: bool = False,
        ) -> FileReport:
            bad = tuple(range(len(e.chunks))) if status != FileStatus.OK else ()
            return FileReport(e.path, status, e.required, size, e.size, bad, detail, fast)

        try:
            guard.check(entry.path)
        except UnsafePathError as exc:
            scans.append(_Scan(entry, entry.path, None, verdict(FileStatus.UNSAFE, None, str(exc))))
            continue
        path = f"{base}/{entry.path}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            scans.append(_Scan(entry, path, None, verdict(FileStatus.MISSING, None)))
            continue
        except NotADirectoryError:
            scans.append(
                _Scan(entry, path, None, verdict(FileStatus.UNSAFE, None, "a parent is a file"))
            )
            continue
        except OSError as exc:  # name too long, permission denied, a symlink loop
            detail = f"cannot be examined: {exc.strerror or exc}"
            scans.append(_Scan(entry, path, None, verdict(FileStatus.UNSAFE, None, detail)))
            continue
        if stat.S_ISLNK(st.st_mode):
            scans.append(
                _Scan(entry, path, st, verdict(FileStatus.CORRUPT, None, "is a symbolic link"))
            )
            continue
        if not stat.S_ISREG(st.st_mode):
            scans.append(
                _Scan(entry, path, st, verdict(FileStatus.UNSAFE, None, "is not a regular file"))
            )
            continue
        record = records.get(entry.path)
        if (
            not full
            and record is not None
            and record[0] == entry.sha256
            and record[1] == StatRecord.of(st)
            and st.st_size == entry.size
        ):
            scans.append(_Scan(entry, path, st, verdict(FileStatus.OK, st.st_size, fast=True)))
            continue
        scans.append(_Scan(entry, path, st, None))
    return scans


def _unexpected(root: Path, manifest: Manifest) -> list[str]:
    """Paths under ``root`` that the manifest does not list (symlinked folders too)."""
    known = {f.path for f in manifest.files}
    found: list[str] = []
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for item in entries:
            rel = prefix + item.name
            if not prefix and item.name == RESERVED_DIR:
                continue
            if item.is_dir(follow_symlinks=False):
                stack.append((item.path, rel + "/"))
            elif rel not in known:
                found.append(rel)
    return sorted(found)


async def _hash_one(scan: _Scan, hasher: IOPool, emit: Emit) -> tuple[FileReport, int]:
    """Hash the chunks of one file that fit in its current size, in batches."""
    entry, st = scan.entry, scan.stat
    assert st is not None
    size = st.st_size
    chunks = entry.chunks
    fits = chunks_within(chunks, size)
    hashed = [0]

    def advanced(n: int) -> None:  # once per batch, not per chunk
        hashed[0] += n
        if len(chunks) > 1:
            emit(StorageHashProgress(path=entry.path, done=hashed[0], total=entry.size))

    try:
        bad = await hasher.mismatched(scan.path, chunks, range(fits), advanced)
    except OSError as exc:
        everything = tuple(range(len(chunks)))
        detail = f"cannot be read: {exc.strerror or exc}"
        report = FileReport(
            entry.path, FileStatus.CORRUPT, entry.required, size, entry.size, everything, detail
        )
        return report, hashed[0]
    bad.extend(range(fits, len(chunks)))
    if size != entry.size:
        status = FileStatus.WRONG_SIZE
        detail = f"{size} bytes, expected {entry.size}"
    elif bad:
        status, detail = FileStatus.CORRUPT, ""
    else:
        status, detail = FileStatus.OK, ""
    return FileReport(
        entry.path, status, entry.required, size, entry.size, tuple(bad), detail
    ), hashed[0]


async def verify_store(
    root: Path,
    manifest: Manifest,
    state: StateStore,
    hasher: IOPool,
    emit: Emit,
    *,
    full: bool = False,
) -> VerifyReport:
    """Check every file of ``manifest`` under ``root``; emits events, returns the report."""
    started = time.perf_counter()
    emit(
        StorageVerifyStarted(
            root=str(root), files=len(manifest.files), total_bytes=manifest.total_size, full=full
        )
    )
    root_exists = await asyncio.to_thread(root.is_dir)
    records = await asyncio.to_thread(state.records) if root_exists else {}
    scans = await asyncio.to_thread(_scan, root, manifest, records, full)
    reports: dict[str, FileReport] = {}
    for scan in scans:
        if scan.report is not None:
            reports[scan.entry.path] = scan.report
            emit(scan.report.event())

    async def check(scan: _Scan) -> tuple[FileReport, int]:
        report, hashed = await _hash_one(scan, hasher, emit)
        emit(report.event())
        return report, hashed

    to_hash = [s for s in scans if s.report is None]
    # Files in parallel, a bounded number at a time (each one's batches are bounded too).
    results = await run_bounded(to_hash, check, hasher.workers * 2)
    verified: list[tuple[str, str, StatRecord]] = []
    for scan, (report, _) in zip(to_hash, results, strict=True):
        reports[scan.entry.path] = report
        if report.status == FileStatus.OK and scan.stat is not None:
            verified.append((scan.entry.path, scan.entry.sha256, StatRecord.of(scan.stat)))
    bytes_hashed = sum(h for _, h in results)
    # Record only files that did not change while they were hashed (stat before == after).
    still = await asyncio.to_thread(_unchanged, root, verified)
    bad = [r.path for r in reports.values() if r.needs_repair]
    if root_exists and (still or bad):
        await asyncio.to_thread(state.put, still)
        await asyncio.to_thread(state.forget, bad)
    ordered = [reports[f.path] for f in manifest.files]
    for rel in await asyncio.to_thread(_unexpected, root, manifest):
        report = FileReport(rel, FileStatus.UNEXPECTED, False, None, None)
        ordered.append(report)
        emit(report.event())
    result = VerifyReport(tuple(ordered), bytes_hashed, time.perf_counter() - started)
    emit(
        StorageVerifyFinished(
            ok=result.ok, counts=result.counts(), bytes_hashed=bytes_hashed, seconds=result.seconds
        )
    )
    return result


def _unchanged(
    root: Path, items: list[tuple[str, str, StatRecord]]
) -> list[tuple[str, str, StatRecord]]:
    keep = []
    for rel, sha, before in items:
        try:
            after = StatRecord.of((root / rel).lstat())
        except OSError:
            continue
        if after == before:
            keep.append((rel, sha, before))
    return keep
