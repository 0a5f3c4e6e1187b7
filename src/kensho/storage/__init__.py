"""The integrity store (roadmap task #19): manifest, verify, repair, offline-first.

::

    from kensho.storage import StorageManager, HttpSource, MirrorSource, load_manifest

    manager = StorageManager(root, load_manifest(path), [MirrorSource("/media/usb")])
    async for event in manager.initialize_and_verify():
        print(event.message)

The manifest schema is documented in ``docs/manifest.md``.
"""

from __future__ import annotations

from kensho.storage._fs import UnsafePathError
from kensho.storage._lock import StoreBusyError
from kensho.storage.builder import build_manifest, list_files
from kensho.storage.hashing import FileDigest, Hasher
from kensho.storage.manager import StorageManager
from kensho.storage.manifest import (
    DEFAULT_CHUNK_SIZE,
    SCHEMA_VERSION,
    Chunk,
    FileEntry,
    Manifest,
    Signature,
    canonical_bytes,
    dump_manifest,
    load_manifest,
    parse_manifest,
)
from kensho.storage.sources import (
    HttpSource,
    MemorySource,
    MirrorSource,
    Sink,
    Source,
    SourceUnreachableError,
    source_from_string,
)
from kensho.storage.state import StateStore, StatRecord
from kensho.storage.status import FileReport, FileStatus, VerifyReport

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SCHEMA_VERSION",
    "Chunk",
    "FileDigest",
    "FileEntry",
    "FileReport",
    "FileStatus",
    "Hasher",
    "HttpSource",
    "Manifest",
    "MemorySource",
    "MirrorSource",
    "Signature",
    "Sink",
    "Source",
    "SourceUnreachableError",
    "StatRecord",
    "StateStore",
    "StorageManager",
    "StoreBusyError",
    "UnsafePathError",
    "VerifyReport",
    "build_manifest",
    "canonical_bytes",
    "dump_manifest",
    "list_files",
    "load_manifest",
    "parse_manifest",
    "source_from_string",
]
