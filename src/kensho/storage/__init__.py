"""The integrity store (roadmap task #19): manifest, verify, repair, offline-first.

::

    from kensho.storage import StorageManager, HttpSource, MirrorSource, load_manifest

    manager = StorageManager(root, load_manifest(path), [MirrorSource("/media/usb")])
    async for event in manager.initialize_and_verify():
        render(event.message)

The manifest schema is documented in ``docs/manifest.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kensho._lazy import lazy_exports

if TYPE_CHECKING:
    from kensho.storage._cdc import DEFAULT_CDC_AVG, DEFAULT_CHUNKING, CdcParams, Chunking
    from kensho.storage._chunk_io import PartWriter
    from kensho.storage._fs import UnsafePathError
    from kensho.storage._lock import StoreBusyError
    from kensho.storage._plan import FilePlan, UpdatePlan
    from kensho.storage.builder import build_manifest, list_files
    from kensho.storage.hashing import FileDigest, Hasher, IOPool
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
    from kensho.storage.report import FileReport, FileStatus, VerifyReport
    from kensho.storage.shelf import ChunkShelf
    from kensho.storage.sources import (
        HttpSource,
        MemorySource,
        MirrorSource,
        ObjectStoreSource,
        PeerSource,
        Sink,
        Source,
        SourceUnreachableError,
        source_from_string,
    )
    from kensho.storage.state import StateStore, StatRecord

__all__ = [
    "DEFAULT_CDC_AVG",
    "DEFAULT_CHUNKING",
    "DEFAULT_CHUNK_SIZE",
    "SCHEMA_VERSION",
    "CdcParams",
    "Chunk",
    "ChunkShelf",
    "Chunking",
    "FileDigest",
    "FileEntry",
    "FilePlan",
    "FileReport",
    "FileStatus",
    "Hasher",
    "HttpSource",
    "IOPool",
    "Manifest",
    "MemorySource",
    "MirrorSource",
    "ObjectStoreSource",
    "PartWriter",
    "PeerSource",
    "Signature",
    "Sink",
    "Source",
    "SourceUnreachableError",
    "StatRecord",
    "StateStore",
    "StorageManager",
    "StoreBusyError",
    "UnsafePathError",
    "UpdatePlan",
    "VerifyReport",
    "build_manifest",
    "canonical_bytes",
    "dump_manifest",
    "list_files",
    "load_manifest",
    "parse_manifest",
    "source_from_string",
]

# Which module defines each public name. Importing any submodule runs this file
# first: eager re-exports made ``kensho.storage._cdc`` cost the whole store (sources,
# httpx, manager); each name now loads on first access.
_EXPORTS: dict[str, str] = {
    "DEFAULT_CDC_AVG": "kensho.storage._cdc",
    "DEFAULT_CHUNKING": "kensho.storage._cdc",
    "CdcParams": "kensho.storage._cdc",
    "Chunking": "kensho.storage._cdc",
    "PartWriter": "kensho.storage._chunk_io",
    "UnsafePathError": "kensho.storage._fs",
    "StoreBusyError": "kensho.storage._lock",
    "FilePlan": "kensho.storage._plan",
    "UpdatePlan": "kensho.storage._plan",
    "build_manifest": "kensho.storage.builder",
    "list_files": "kensho.storage.builder",
    "FileDigest": "kensho.storage.hashing",
    "Hasher": "kensho.storage.hashing",
    "IOPool": "kensho.storage.hashing",
    "StorageManager": "kensho.storage.manager",
    "DEFAULT_CHUNK_SIZE": "kensho.storage.manifest",
    "SCHEMA_VERSION": "kensho.storage.manifest",
    "Chunk": "kensho.storage.manifest",
    "FileEntry": "kensho.storage.manifest",
    "Manifest": "kensho.storage.manifest",
    "Signature": "kensho.storage.manifest",
    "canonical_bytes": "kensho.storage.manifest",
    "dump_manifest": "kensho.storage.manifest",
    "load_manifest": "kensho.storage.manifest",
    "parse_manifest": "kensho.storage.manifest",
    "FileReport": "kensho.storage.report",
    "FileStatus": "kensho.storage.report",
    "VerifyReport": "kensho.storage.report",
    "ChunkShelf": "kensho.storage.shelf",
    "HttpSource": "kensho.storage.sources",
    "MemorySource": "kensho.storage.sources",
    "MirrorSource": "kensho.storage.sources",
    "ObjectStoreSource": "kensho.storage.sources",
    "PeerSource": "kensho.storage.sources",
    "Sink": "kensho.storage.sources",
    "Source": "kensho.storage.sources",
    "SourceUnreachableError": "kensho.storage.sources",
    "source_from_string": "kensho.storage.sources",
    "StateStore": "kensho.storage.state",
    "StatRecord": "kensho.storage.state",
}

if not TYPE_CHECKING:  # mypy reads the imports above: a misspelt name stays an error
    __getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, __all__)
