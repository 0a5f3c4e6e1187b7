"""Many tiny chunks (issue 11, item 4): refused below the limits, linear up to them.

640,000 one-byte chunks once took 100 s and 3.9 GiB to verify 640 KB, and a sync never
finished: one task, thread job and event per chunk, and a reuse count quadratic in
the chunk count. Now chunks below ``MIN_CHUNK_SIZE`` (but a file's last) and more than
``MAX_CHUNKS`` in all are refused at parse, naming the field, and a manifest at the
maximum verifies through the real CLI, and syncs, in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from _storage_support import kensho, sha, write_tree
from kensho.errors import ManifestError
from kensho.events import StorageDownloadProgress, StorageFileRepaired, StorageHashProgress
from kensho.storage import MemorySource, MirrorSource, StorageManager, parse_manifest
from kensho.storage._plan import plan_update
from kensho.storage.hashing import BATCH_CHUNKS
from kensho.storage.manifest import MAX_CHUNKS, MIN_CHUNK_SIZE

HEX = "ab" * 32


def signed_doc(files: dict[str, bytes], chunk_size: int) -> dict[str, Any]:
    """A manifest envelope cutting each file into ``chunk_size``-byte chunks."""
    entries = []
    for rel, data in sorted(files.items()):
        chunks = [
            {"offset": off, "size": len(data[off : off + chunk_size]), "sha256": sha(piece)}
            for off in range(0, len(data), chunk_size)
            if (piece := data[off : off + chunk_size])
        ]
        entries.append({"path": rel, "size": len(data), "sha256": sha(data), "chunks": chunks})
    signed = {
        "schema": 1,
        "name": "tiny",
        "version": "1",
        "serial": 1,
        "created": "2026-11-25T10:00:00Z",
        "files": entries,
    }
    return {"signed": signed, "signatures": []}


def fake_chunks(count: int, size: int) -> list[dict[str, Any]]:
    """Chunk objects with a valid-looking hash (parse checks shape, not content)."""
    return [{"offset": i * size, "size": size, "sha256": HEX} for i in range(count)]


def test_a_chunk_below_the_minimum_is_refused_at_parse() -> None:
    doc = signed_doc({"w.bin": os.urandom(10 * MIN_CHUNK_SIZE)}, MIN_CHUNK_SIZE - 1)
    with pytest.raises(ManifestError, match=f"at least {MIN_CHUNK_SIZE} bytes, got 63") as info:
        parse_manifest(doc)
    assert info.value.field == "files[0].chunks[0].size"
    assert "files[0].chunks[0].size" in str(info.value)


def test_only_the_last_chunk_may_be_smaller_than_the_minimum() -> None:
    data = os.urandom(3 * MIN_CHUNK_SIZE + 1)
    manifest = parse_manifest(signed_doc({"w.bin": data, "one.bin": b"x"}, MIN_CHUNK_SIZE))
    w = manifest.file("w.bin")
    assert w is not None and [c.size for c in w.chunks] == [64, 64, 64, 1]
    one = manifest.file("one.bin")
    assert one is not None and [c.size for c in one.chunks] == [1]


def test_more_chunks_in_all_than_the_limit_are_refused_naming_the_file() -> None:
    first = MAX_CHUNKS // 2
    second = MAX_CHUNKS - first + 1  # one too many, counted over both files
    doc: dict[str, Any] = {
        "signed": {
            "schema": 1,
            "name": "x",
            "version": "1",
            "serial": 1,
            "created": "2026-11-25T10:00:00Z",
            "files": [
                {
                    "path": "a.bin",
                    "size": first * 64,
                    "sha256": HEX,
                    "chunks": fake_chunks(first, 64),
                },
                {
                    "path": "b.bin",
                    "size": second * 64,
                    "sha256": HEX,
                    "chunks": fake_chunks(second, 64),
                },
            ],
        },
        "signatures": [],
    }
    with pytest.raises(ManifestError, match=f"more than {MAX_CHUNKS} chunks in all") as info:
        parse_manifest(doc)
    assert info.value.field == "files[1].chunks"
    doc["signed"]["files"][1]["chunks"].pop()
    doc["signed"]["files"][1]["size"] -= 64
    assert len(parse_manifest(doc).files) == 2  # exactly at the limit: accepted


def test_cli_refuses_one_byte_chunks_and_writes_nothing(tmp_path: Path) -> None:
    """The attack of the issue, scaled down: one-byte chunks never reach the store."""
    data = os.urandom(2000)
    mirror, store = tmp_path / "mirror", tmp_path / "store"
    write_tree(mirror, {"w.bin": data})
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(signed_doc({"w.bin": data}, 1)))
    done = kensho("sync", "-m", manifest, "-r", store, "-s", mirror, cwd=tmp_path)
    assert done.returncode == 10, done.stderr
    assert "files[0].chunks[0].size" in done.stderr
    assert f"at least {MIN_CHUNK_SIZE} bytes" in done.stderr
    assert not store.exists()


def test_cli_verifies_a_manifest_at_the_maximum(tmp_path: Path) -> None:
    """MAX_CHUNKS chunks of MIN_CHUNK_SIZE bytes: verify --full finds the one bad chunk."""
    data = bytearray(os.urandom(MAX_CHUNKS * MIN_CHUNK_SIZE))
    manifest = tmp_path / "max.json"
    manifest.write_bytes(orjson.dumps(signed_doc({"tiny.bin": bytes(data)}, MIN_CHUNK_SIZE)))
    bad = MAX_CHUNKS - 3 * BATCH_CHUNKS // 2  # inside a batch, far from the start
    data[bad * MIN_CHUNK_SIZE + 7] ^= 0xFF
    store = tmp_path / "store"
    write_tree(store, {"tiny.bin": bytes(data)})
    done = kensho("verify", "--full", "--json", "-m", manifest, "-r", store, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    checked = [e for e in events if e.get("path") == "tiny.bin" and "status" in e]
    assert [(e["status"], e["bad_chunks"]) for e in checked] == [("corrupt", [bad])]
    hashed = [e for e in events if e.get("path") == "tiny.bin" and "done" in e]
    assert hashed[-1]["done"] == len(data)  # every chunk was hashed


async def test_sync_at_the_maximum_rebuilds_the_file(tmp_path: Path) -> None:
    """An empty store filled from a mirror, MAX_CHUNKS chunks, each checked on the way in."""
    data = os.urandom(MAX_CHUNKS * MIN_CHUNK_SIZE)
    write_tree(tmp_path / "mirror", {"tiny.bin": data})
    manifest = parse_manifest(signed_doc({"tiny.bin": data}, MIN_CHUNK_SIZE))
    root = tmp_path / "store"
    async with StorageManager(root, manifest, [MirrorSource(tmp_path / "mirror")]) as manager:
        events = [e async for e in manager.initialize_and_verify()]
    assert (root / "tiny.bin").read_bytes() == data
    repaired = [e for e in events if isinstance(e, StorageFileRepaired)]
    assert [(e.path, e.fetched, e.reused) for e in repaired] == [("tiny.bin", len(data), 0)]


async def test_progress_is_one_event_per_batch_not_per_chunk(tmp_path: Path) -> None:
    count = 20_000
    data = os.urandom(count * MIN_CHUNK_SIZE)
    manifest = parse_manifest(signed_doc({"w.bin": data}, MIN_CHUNK_SIZE))
    async with StorageManager(tmp_path, manifest, [MemorySource({"w.bin": data})]) as manager:
        fetched = [e async for e in manager.repair()]
        hashed = [e async for e in manager.verify(full=True)]
        assert manager.report is not None and manager.report.ok
    assert (tmp_path / "w.bin").read_bytes() == data
    downloads = [e for e in fetched if isinstance(e, StorageDownloadProgress)]
    # One write job per MiB received (or per end of run), not one per chunk.
    assert 1 <= len(downloads) <= math.ceil(len(data) / (1 << 20)) + 1
    assert downloads[-1].done == downloads[-1].total == len(data)
    progress = [e for e in hashed if isinstance(e, StorageHashProgress)]
    assert len(progress) == math.ceil(count / BATCH_CHUNKS)
    assert progress[-1].done == len(data)


async def test_repair_copies_good_tiny_chunks_and_fetches_only_bad_ones(tmp_path: Path) -> None:
    count = 3 * BATCH_CHUNKS
    data = os.urandom(count * MIN_CHUNK_SIZE)
    manifest = parse_manifest(signed_doc({"w.bin": data}, MIN_CHUNK_SIZE))
    broken = bytearray(data)
    bad = [0, BATCH_CHUNKS - 1, BATCH_CHUNKS, 5000, count - 1]  # across batch borders
    for i in bad:
        broken[i * MIN_CHUNK_SIZE] ^= 0xFF
    (tmp_path / "w.bin").write_bytes(bytes(broken))
    source = MemorySource({"w.bin": data})
    async with StorageManager(tmp_path, manifest, [source]) as manager:
        [_ async for _ in manager.repair()]
        assert manager.report is not None and manager.report.ok
    assert hashlib.sha256((tmp_path / "w.bin").read_bytes()).hexdigest() == sha(data)
    assert source.bytes_served == len(bad) * MIN_CHUNK_SIZE
    runs = [(0, 1), (BATCH_CHUNKS - 1, 2), (5000, 1), (count - 1, 1)]
    assert source.requests == [("w.bin", i * MIN_CHUNK_SIZE, n * MIN_CHUNK_SIZE) for i, n in runs]


def test_update_plan_stays_linear_when_one_hash_repeats_everywhere(tmp_path: Path) -> None:
    """50,000 identical chunks: each gets a few donors by lookup, not a scan of all."""
    count = 50_000
    old = bytes(count * MIN_CHUNK_SIZE)  # zeros: every chunk has the same hash
    new = bytearray(old)
    changed = [7, count - 1]
    for i in changed:
        new[i * MIN_CHUNK_SIZE] = 1
    write_tree(tmp_path, {"w.bin": old, "copy.bin": old})
    current = parse_manifest(signed_doc({"w.bin": old, "copy.bin": old}, MIN_CHUNK_SIZE))
    doc = signed_doc({"w.bin": bytes(new), "copy.bin": old}, MIN_CHUNK_SIZE)
    doc["signed"]["serial"] = 2
    plan = plan_update(tmp_path, current, parse_manifest(doc), {})
    [file_plan] = plan.files
    assert file_plan.fetch == tuple(changed)
    assert len(file_plan.donors) == count - len(changed)
    for places in file_plan.donors.values():
        assert 1 <= len(places) <= 4
        assert places[0].path == "w.bin"  # the same file first, then the others
