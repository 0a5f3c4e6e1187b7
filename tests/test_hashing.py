"""Parallel SHA-256: ranges, short files, symlinks, digests, and the loop stays free."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

import pytest

from kensho.storage import Hasher
from kensho.storage.hashing import BUFFER_SIZE, sha256_range


def test_sha256_range_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * BUFFER_SIZE + 123)
    (tmp_path / "f").write_bytes(data)
    seen: list[int] = []
    got = sha256_range(tmp_path / "f", 1000, 2 * BUFFER_SIZE + 7, seen.append)
    assert got == hashlib.sha256(data[1000 : 1000 + 2 * BUFFER_SIZE + 7]).hexdigest()
    assert sum(seen) == 2 * BUFFER_SIZE + 7


def test_range_past_end_is_none(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_range(tmp_path / "f", 0, 10) is None
    assert sha256_range(tmp_path / "f", 3, 1) is None
    assert sha256_range(tmp_path / "f", 0, 0) == hashlib.sha256(b"").hexdigest()


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as info:
        sha256_range(tmp_path / "link", 0, 3)
    assert info.value.errno == errno.ELOOP


async def test_hash_ranges_in_parallel(tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    (tmp_path / "f").write_bytes(data)
    ranges = [(off, 100_000) for off in range(0, 1_000_000, 100_000)] + [(999_999, 5)]
    async with Hasher(workers=2) as hasher:
        got = await hasher.hash_ranges(tmp_path / "f", ranges)
    want = [hashlib.sha256(data[o : o + n]).hexdigest() for o, n in ranges[:-1]]
    assert got == [*want, None]


async def test_digest_file_whole_and_chunks(tmp_path: Path) -> None:
    data = os.urandom(2_500_000)
    (tmp_path / "f").write_bytes(data)
    async with Hasher() as hasher:
        digest = await hasher.digest_file(tmp_path / "f", 1_000_000)
    assert digest.size == len(data)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert [(c.offset, c.size) for c in digest.chunks] == [
        (0, 1_000_000),
        (1_000_000, 1_000_000),
        (2_000_000, 500_000),
    ]
    assert digest.chunks[2].sha256 == hashlib.sha256(data[2_000_000:]).hexdigest()


async def test_event_loop_keeps_running_while_hashing(tmp_path: Path) -> None:
    """Hashing runs in threads: a ticker on the loop advances while a big hash runs."""
    (tmp_path / "f").write_bytes(os.urandom(32 * BUFFER_SIZE))
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async with Hasher(workers=1) as hasher:
        task = asyncio.create_task(ticker())
        await hasher.hash_ranges(tmp_path / "f", [(0, 32 * BUFFER_SIZE)])
        done.set()
        await task
    assert ticks > 1
