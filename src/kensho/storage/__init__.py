"""The integrity store (roadmap task #19): manifest, verify, repair, offline-first.

::

    from kensho.storage import StorageManager, HttpSource, MirrorSource, load_manifest

    manager = StorageManager(root, load_manifest(path), [MirrorSource("/media/usb")])
    async for event in manager.initialize_and_verify():
        render(event.message)

The manifest schema is documented in ``docs/manifest.md``.
"""

from __future__ import annotations

from kensho.storage._cdc import DEFAULT_CDC_AVG, CdcParams
from kensho.storage._chunk_io import PartWriter
from kensho.storage._fs import UnsafePathError
from kensho.storage._lock import StoreBusyError
from kensho.storage._plan import FilePlan, UpdatePlan
from kensho.storage.builder import DEFAULT_CHUNKING, Chunking, build_manifest, list_files
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
