"""Helpers for the over-the-air release tests: signed releases, installed stores."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _storage_support import signed_for, write_tree
from kensho.events import Event
from kensho.storage import (
    HttpSource,
    Manifest,
    Source,
    StorageManager,
    dump_manifest,
    parse_manifest,
)
from kensho.storage.signing import (
    TrustedKeys,
    generate_private_key,
    public_key_hex,
    sign_manifest,
)

CHUNK = 4096
KEY = generate_private_key()
OTHER_KEY = generate_private_key()
TRUST = TrustedKeys.from_hex([public_key_hex(KEY.public_key())])
TRUST_HEX = public_key_hex(KEY.public_key())


def release(files: Mapping[str, bytes], serial: int, *, key: Any = KEY, **extra: Any) -> Manifest:
    """A release of ``files`` (4 KiB chunks), signed by ``key`` (``None``: unsigned)."""
    signed = signed_for(files, CHUNK, serial=serial, version=f"1.{serial}", **extra)
    manifest = parse_manifest({"signed": signed, "signatures": []})
    return manifest if key is None else sign_manifest(manifest, key)


def published(manifest: Manifest, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """What an origin serves for ``manifest``: its files and ``manifest.json``."""
    return {**files, "manifest.json": dump_manifest(manifest)}


def http(url: str) -> HttpSource:
    return HttpSource(url, wait_initial=0.01, wait_max=0.05, wait_jitter=0.0, attempts=2)


async def install(root: Path, files: Mapping[str, bytes], manifest: Manifest) -> None:
    """A store already synced to ``manifest`` (trusted, keys pinned)."""
    write_tree(root, files)
    async with StorageManager(root, manifest, trust=TRUST) as manager:
        async for _ in manager.initialize_and_verify():
            pass


def manager(root: Path, sources: list[Source], **kw: Any) -> StorageManager:
    return StorageManager(root, None, sources, trust=TRUST, **kw)


class Recorder:
    """An ``emit`` that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]
