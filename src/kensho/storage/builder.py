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
from kensho.storage.hashing import Hasher, ProgressCallback
from kensho.storage.manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_FILE_SIZE,
    RESERVED_DIR,
    SCHEMA_VERSION,
    Manifest,
    parse_manifest,
)

__all__ = ["build_manifest", "list_files"]


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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    optional: Sequence[str] = (),
    changelog: str = "",
    created: datetime | None = None,
    expires: datetime | None = None,
    hasher: Hasher | None = None,
    progress: ProgressCallback | None = None,
) -> Manifest:
    """Hash every file under ``folder`` into a validated manifest.

    ``optional`` holds glob patterns (``fnmatch``, ``*`` also crosses ``/``) of files
    marked ``required: false``. ``progress`` receives byte counts from worker threads.
    """
    if not 1 <= chunk_size <= MAX_FILE_SIZE:
        raise ManifestError(f"chunk size must be between 1 and {MAX_FILE_SIZE} bytes")
    paths = await asyncio.to_thread(list_files, folder)
    own = hasher is None
    pool = hasher or Hasher()
    try:
        digests = await asyncio.gather(
            *(pool.digest_file(folder / p, chunk_size, progress) for p in paths)
        )
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
