"""Build a manifest from a folder: every regular file, hashed in parallel.

The result goes through :func:`parse_manifest` before it is returned, so a folder
whose names break a rule (a backslash, a name that differs only by case) fails here,
at publishing time, with the same message a client would give.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kensho.errors import ManifestError
from kensho.storage._cdc import CHUNKING_SCHEMES, DEFAULT_CHUNKING, CdcParams, Chunking, cdc_ranges
from kensho.storage.hashing import FileDigest, IOPool, ProgressCallback
from kensho.storage.manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_FILE_SIZE,
    RESERVED_DIR,
    SCHEMA_VERSION,
    Manifest,
    parse_manifest,
)

__all__ = ["CHUNKING_SCHEMES", "DEFAULT_CHUNKING", "Chunking", "build_manifest", "list_files"]


def list_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``folder``, sorted.

    Kensho's own ``.kensho/`` folder is skipped. A symlink is an error: a manifest
    describes bytes, and a link would make the published content depend on the
    publisher's machine.
    """
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder; give the folder to build from")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        if base == folder and RESERVED_DIR in dirnames:
            dirnames.remove(RESERVED_DIR)
        for name in [*dirnames, *filenames]:
            full = base / name
            mode = full.lstat().st_mode
            rel = full.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                raise ManifestError(
                    f"{full} is a symbolic link; copy the file it points to instead"
                )
            if name in filenames and stat.S_ISREG(mode):
                found.append(rel)
    found.sort()
    return found


async def build_manifest(
    folder: Path,
    *,
    name: str,
    version: str,
    serial: int = 1,
    chunk_size: int | None = None,
    optional: Sequence[str] = (),
    changelog: str = "",
    created: datetime | None = None,
    expires: datetime | None = None,
    hasher: IOPool | None = None,
    progress: ProgressCallback | None = None,
    chunking: Chunking | None = None,
    cdc: CdcParams | None = None,
) -> Manifest:
    """Hash every file under ``folder`` into a validated manifest.

    ``optional`` holds glob patterns (``fnmatch``, ``*`` also crosses ``/``) of files
    marked ``required: false``. ``progress`` receives byte counts from worker threads.
    ``chunking`` picks fixed-size chunks of ``chunk_size`` bytes (default 4 MiB) or
    content-defined chunks sized by ``cdc`` (default :class:`CdcParams`); the schema
    is the same. Left out, it is :data:`DEFAULT_CHUNKING`, except that a caller who
    gives only ``chunk_size`` asked for chunks of that size and gets ``fixed``.
    """
    if chunking is None:
        chunking = "fixed" if chunk_size is not None and cdc is None else DEFAULT_CHUNKING
    if chunking not in CHUNKING_SCHEMES:
        raise ManifestError(f"chunking must be one of {', '.join(CHUNKING_SCHEMES)}")
    fixed_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if not 1 <= fixed_size <= MAX_FILE_SIZE:
        raise ManifestError(f"chunk size must be between 1 and {MAX_FILE_SIZE} bytes")
    params = cdc or CdcParams()
    params.validate()
    paths = await asyncio.to_thread(list_files, folder)
    own = hasher is None
    pool = hasher or IOPool()

    async def digest_one(path: Path) -> FileDigest:
        if chunking == "fixed":
            return await pool.digest_file(path, fixed_size, progress)
        size = (await pool.run(os.stat, path)).st_size
        ranges = await pool.run(cdc_ranges, path, size, params)
        return await pool.digest_ranges(path, size, ranges, progress)

    try:
        digests = await asyncio.gather(*(digest_one(folder / p) for p in paths))
    finally:
        if own:
            pool.close()
    files: list[dict[str, Any]] = []
    for rel, digest in zip(paths, digests, strict=True):
        files.append(
            {
                "path": rel,
                "size": digest.size,
                "sha256": digest.sha256,
                "version": version,
                "changelog": changelog,
                "required": not any(fnmatch.fnmatchcase(rel, pat) for pat in optional),
                "chunks": [
                    {"offset": c.offset, "size": c.size, "sha256": c.sha256} for c in digest.chunks
                ],
            }
        )
    signed: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "serial": serial,
        "created": _ts(created or datetime.now(UTC)),
        "files": files,
    }
    if expires is not None:
        signed["expires"] = _ts(expires)
    return parse_manifest({"signed": signed, "signatures": []})


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
