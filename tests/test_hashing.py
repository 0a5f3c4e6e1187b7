"""Parallel SHA-256: ranges, short files, symlinks, digests, and the loop stays free."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

import pytest

from kensho.storage import IOPool
from kensho.storage.hashing import (
    BATCH_BYTES,
    BATCH_CHUNKS,
    BUFFER_SIZE,
    chunk_batches,
    run_bounded,
    run_by_size,
    sha256_range,
)
from kensho.storage.manifest import Chunk


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
    async with IOPool(workers=2) as hasher:
        got = await hasher.hash_ranges(tmp_path / "f", ranges)
    want = [hashlib.sha256(data[o : o + n]).hexdigest() for o, n in ranges[:-1]]
    assert got == [*want, None]


async def test_digest_file_whole_and_chunks(tmp_path: Path) -> None:
    data = os.urandom(2_500_000)
    (tmp_path / "f").write_bytes(data)
    async with IOPool() as hasher:
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

    async with IOPool(workers=1) as hasher:
        task = asyncio.create_task(ticker())
        await hasher.hash_ranges(tmp_path / "f", [(0, 32 * BUFFER_SIZE)])
        done.set()
        await task
    assert ticks > 1


def _chunks_of(data: bytes, sizes: list[int]) -> tuple[Chunk, ...]:
    chunks, off = [], 0
    for n in sizes:
        chunks.append(Chunk(off, n, hashlib.sha256(data[off : off + n]).hexdigest()))
        off += n
    return tuple(chunks)


def test_batches_group_adjacent_chunks_within_both_limits() -> None:
    tiny = tuple(Chunk(i * 64, 64, "0" * 64) for i in range(BATCH_CHUNKS + 10))
    batches = chunk_batches(tiny, range(len(tiny)))
    assert batches == [range(0, BATCH_CHUNKS), range(BATCH_CHUNKS, BATCH_CHUNKS + 10)]
    # A gap starts a new batch: a batch is always one contiguous read.
    assert chunk_batches(tiny, [0, 1, 2, 5, 6]) == [range(0, 3), range(5, 7)]
    big = BATCH_BYTES // 2 + 1
    sizes = (Chunk(0, big, "0" * 64), Chunk(big, big, "0" * 64), Chunk(2 * big, 3 * big, "0" * 64))
    # Two halves do not fit in one buffer; a chunk larger than the buffer is alone.
    assert chunk_batches(sizes, range(3)) == [range(0, 1), range(1, 2), range(2, 3)]
    assert chunk_batches(tiny, []) == []


async def test_mismatched_names_exactly_the_bad_and_missing_chunks(tmp_path: Path) -> None:
    sizes = [64] * (2 * BATCH_CHUNKS + 5) + [BATCH_BYTES + 3, 64]  # tiny ones, one large
    data = os.urandom(sum(sizes))
    chunks = _chunks_of(data, sizes)
    broken = bytearray(data)
    wrong = [0, BATCH_CHUNKS - 1, BATCH_CHUNKS, 2 * BATCH_CHUNKS + 4, len(sizes) - 2]
    for i in wrong:
        broken[chunks[i].offset + chunks[i].size - 1] ^= 1
    (tmp_path / "f").write_bytes(bytes(broken[:-10]))  # the last chunk is cut short
    seen: list[int] = []
    async with IOPool(workers=2) as hasher:
        bad = await hasher.mismatched(tmp_path / "f", chunks, range(len(chunks)), seen.append)
    assert bad == [*wrong, len(sizes) - 1]
    assert sum(seen) == len(data)  # progress per batch adds up to the bytes asked for
    assert len(seen) == len(chunk_batches(chunks, range(len(chunks))))


async def test_run_bounded_keeps_order_and_never_exceeds_its_limit() -> None:
    running, peak = 0, 0

    async def job(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)  # yield: let the other workers start if they may
        running -= 1
        return n * n

    assert await run_bounded(list(range(100)), job, 3) == [n * n for n in range(100)]
    assert peak == 3
    assert await run_bounded([], job, 3) == []


class _Tally:
    """Jobs running now, the most at once, and the order they started in."""

    def __init__(self) -> None:
        self.running: list[int] = []
        self.started: list[int] = []
        self.returned = 0
        self.peak_before_a_return = 0
        self.peak = 0

    async def job(self, n: int) -> int:
        self.running.append(n)
        self.started.append(n)
        self.peak = max(self.peak, len(self.running))
        if not self.returned:
            self.peak_before_a_return = max(self.peak_before_a_return, len(self.running))
        for _ in range(50):  # yield: let the other workers start if they may
            await asyncio.sleep(0)
        self.running.remove(n)
        self.returned += 1
        return -n


async def test_run_by_size_runs_limit_large_items_at_a_time() -> None:
    tally = _Tally()
    sizes = [1000] * 12  # each larger than a slot
    got = await run_by_size(
        list(range(12)), tally.job, sizes.__getitem__, limit=2, slot_bytes=100, most=8
    )
    assert got == [-n for n in range(12)]
    assert tally.peak == 2
    assert tally.started == list(range(12))


async def test_run_by_size_lets_small_items_share_the_slots_once_a_job_returned() -> None:
    """Small items: ``most`` at once, but only ``limit`` until the first one returned
    (a failing source is judged by two requests, not by ``most``)."""
    tally = _Tally()
    sizes = [10] * 40  # 20 fit in the two slots of 100 bytes; ``most`` caps at 8
    got = await run_by_size(
        list(range(40)), tally.job, sizes.__getitem__, limit=2, slot_bytes=100, most=8
    )
    assert got == [-n for n in range(40)]
    assert tally.peak_before_a_return == 2
    assert tally.peak == 8
    assert tally.started == list(range(40))


async def test_run_by_size_runs_small_items_beside_the_large_ones_within_their_bytes() -> None:
    """Large items keep to ``limit`` at once; small ones run beside them, as many as fit
    in one slot's bytes together; each kind starts in order."""
    sizes = [5, 1000, 1000, 60, 60, 60, 1000, 5, 5, 1000]
    large: list[int] = []
    small: list[int] = []
    peaks = {"large": 0, "small bytes": 0, "small beside two large": 0}
    tally = _Tally()

    async def job(n: int) -> int:
        held = large if sizes[n] >= 100 else small
        held.append(n)
        peaks["large"] = max(peaks["large"], len(large))
        peaks["small bytes"] = max(peaks["small bytes"], sum(sizes[i] for i in small))
        if len(large) == 2:
            peaks["small beside two large"] = max(peaks["small beside two large"], len(small))
        try:
            return await tally.job(n)
        finally:
            held.remove(n)

    got = await run_by_size(
        list(range(len(sizes))), job, sizes.__getitem__, limit=2, slot_bytes=100, most=8
    )
    assert got == [-n for n in range(len(sizes))]
    assert peaks["large"] == 2
    assert peaks["small bytes"] <= 100
    assert peaks["small beside two large"] >= 1
    started_large = [n for n in tally.started if sizes[n] >= 100]
    started_small = [n for n in tally.started if sizes[n] < 100]
    assert started_large == sorted(started_large)
    assert started_small == sorted(started_small)
