"""The write path: the whole-file SHA-256 computed while a file is built, write-back hints.

A built file is checked against the manifest's whole-file ``sha256`` before it is
placed. That digest is now fed the fetched bytes as their chunks match, instead of
reading the file back after writing it; these tests hold it to the same guarantee:
only verified bytes, in file order, whatever mix of local, resumed, fetched, cut off
and refetched chunks built the file, on real files and a real HTTP server.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from _storage_support import http_server, manifest_for, signed_for
from kensho.errors import IntegrityError
from kensho.storage import (
    HttpSource,
    Manifest,
    MemorySource,
    Source,
    StorageManager,
    _chunk_io,
    _fs,
    parse_manifest,
)
from kensho.storage._chunk_io import WholeDigest
from kensho.storage.manifest import Chunk

CHUNK = 64 * 1024
DATA = os.urandom(40 * CHUNK + 777)  # 40 full chunks and a short one: several write jobs


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks_of(data: bytes, size: int) -> list[Chunk]:
    return [
        Chunk(off, len(data[off : off + size]), sha(data[off : off + size]))
        for off in range(0, len(data), size)
    ]


async def sync(root: Path, manifest: Manifest, sources: list[Source]) -> StorageManager:
    manager = StorageManager(root, manifest, sources)
    try:
        async for _ in manager.initialize_and_verify():
            pass
    finally:
        await manager.aclose()
    return manager


@pytest.fixture
def preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes read with ``os.preadv`` (every read of Kensho's file layer), per call."""
    seen: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = real(fd, buffers, offset)
        seen.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting)
    return seen


async def test_fresh_http_sync_checks_the_whole_file_without_reading_it_back(
    tmp_path: Path, preads: list[int]
) -> None:
    files = {"models/w.bin": DATA}
    with http_server(files) as (url, _):
        manager = await sync(tmp_path, manifest_for(files, CHUNK), [HttpSource(url)])
    assert manager.report is not None and manager.report.ok
    assert (tmp_path / "models/w.bin").read_bytes() == DATA
    assert sum(preads) == 0  # before: the whole file was read back once to hash it


async def test_streamed_whole_hash_still_refuses_a_manifest_whose_sha256_is_wrong(
    tmp_path: Path,
) -> None:
    files = {"w.bin": DATA}
    signed = signed_for(files, CHUNK)
    signed["files"][0]["sha256"] = sha(DATA[:-1] + b"\x00")  # every chunk hash stays right
    manifest = parse_manifest({"signed": signed, "signatures": []})
    with http_server(files) as (url, _), pytest.raises(IntegrityError) as info:
        await sync(tmp_path, manifest, [HttpSource(url)])
    assert "whole file's SHA-256 does not match" in str(info.value)
    assert not (tmp_path / "w.bin").exists()
    assert list((tmp_path / ".kensho/tmp").glob("*.part")) == []


async def test_a_chunk_cut_off_mid_way_then_refetched_elsewhere_never_enters_the_digest(
    tmp_path: Path,
) -> None:
    """The first source delivers 2 chunks and half a chunk of garbage, and breaks
    before that chunk could be checked: the garbage was written and hashed for its
    chunk check, but must not reach the whole-file digest (the second source sends
    that chunk again from its first byte, over the garbage)."""
    files = {"w.bin": DATA}

    def cut(path: str, offset: int, length: int) -> bytes:
        return DATA[offset : offset + 2 * CHUNK] + os.urandom(CHUNK // 2)

    first = MemorySource(handler=cut, name="cut")
    second = MemorySource(files, name="good")
    manager = await sync(tmp_path, manifest_for(files, CHUNK), [first, second])
    assert manager.report is not None and manager.report.ok
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert second.requests == [("w.bin", 2 * CHUNK, len(DATA) - 2 * CHUNK)]


async def test_wrong_bytes_from_one_source_never_enter_the_digest(tmp_path: Path) -> None:
    files = {"w.bin": DATA}
    with http_server(files, corrupt=True) as (bad, _), http_server(files) as (good, _):
        manager = await sync(
            tmp_path, manifest_for(files, CHUNK), [HttpSource(bad), HttpSource(good)]
        )
    assert manager.report is not None and manager.report.ok
    assert (tmp_path / "w.bin").read_bytes() == DATA


async def test_repair_mixes_local_and_fetched_chunks_in_file_order(tmp_path: Path) -> None:
    """Chunks 3 and 30 are damaged: the digest hashes the good local chunks from the
    file and the two fetched ones as they come, in order."""
    damaged = bytearray(DATA)
    damaged[3 * CHUNK + 5] ^= 1
    damaged[30 * CHUNK] ^= 1
    (tmp_path / "w.bin").write_bytes(damaged)
    files = {"w.bin": DATA}
    source = MemorySource(files)
    manager = await sync(tmp_path, manifest_for(files, CHUNK), [source])
    assert manager.report is not None and manager.report.ok
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert [offset for _, offset, _ in source.requests] == [3 * CHUNK, 30 * CHUNK]


async def test_chunks_larger_than_what_is_held_are_read_back_and_still_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_chunk_io, "_HOLD", 3000)  # chunks of 64 KiB: never held whole
    files = {"w.bin": DATA}
    with http_server(files) as (url, _):
        manager = await sync(tmp_path, manifest_for(files, CHUNK), [HttpSource(url)])
    assert manager.report is not None and manager.report.ok
    assert (tmp_path / "w.bin").read_bytes() == DATA


def test_whole_digest_any_order_of_final_chunks_gives_the_file_hash(tmp_path: Path) -> None:
    """Local chunks known up front, fetched runs out of order, a run whose first
    bytes were not kept: the digest reads the gaps back once they are final."""
    data = os.urandom(10 * 1000 + 13)
    chunks = chunks_of(data, 1000)
    path = tmp_path / "f.part"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = WholeDigest(fd, chunks, final=[0, 1, 6])
        view = memoryview(data)
        whole.add(range(7, 9), 7 * 1000, [view[7000:8000], view[8000:9000]])  # a gap before
        assert whole.hexdigest() is None  # chunks 2-5 and 9-10 are not final yet
        whole.add(range(2, 6), 2500, [view[2500:6000]])  # 2000-2500 were not held
        whole.add(range(9, 11), 9000, [view[9000:]])
        assert whole.pos == len(data)
        assert whole.hexdigest() == sha(data)
    finally:
        os.close(fd)


def test_whole_digest_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.part"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert WholeDigest(fd, [], final=[]).hexdigest() == sha(b"")
    finally:
        os.close(fd)


def test_whole_digest_reports_a_partial_file_shorter_than_its_chunks(tmp_path: Path) -> None:
    data = os.urandom(3000)
    path = tmp_path / "short.part"
    path.write_bytes(data[:2500])
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ended at byte 2500 of 3000"):
            WholeDigest(fd, chunks_of(data, 1000), final=[0, 1, 2]).hexdigest()
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_write_back_hint_is_available_and_changes_no_byte(tmp_path: Path) -> None:
    assert _fs._start_write_out is not None  # the hint is really given on Linux
    path = tmp_path / "f"
    data = os.urandom(3 * CHUNK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, data, 0)
        _fs.start_writeback(fd, 0, len(data))
        _fs.start_writeback(fd, CHUNK, 0)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
