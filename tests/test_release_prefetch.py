"""Background prefetch into ``.kensho/staging`` and the offline apply, with a real
HTTP origin on 127.0.0.1 counting bytes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from _peer_support import share_server
from _release_support import CHUNK, Recorder, http, install, manager, release
from _storage_support import http_server
from kensho.errors import SignatureError
from kensho.events import (
    ReleaseApplied,
    ReleaseApplyFailed,
    ReleasePrefetchProgress,
    ReleasePrefetchStopped,
    ReleaseStaged,
)
from kensho.storage import parse_manifest
from kensho.storage.prefetch import Prefetcher, RateLimiter, Staging, apply_staged
from kensho.storage.signing import manifest_digest
from kensho.storage.sources import PeerSource, source_from_string

OLD = os.urandom(64 * CHUNK)
V1 = {"w.bin": OLD, "config.json": b'{"layers": 2}'}
# One changed chunk in the middle, and a new small file.
V2 = {
    "w.bin": OLD[: 20 * CHUNK] + os.urandom(CHUNK) + OLD[21 * CHUNK :],
    "config.json": V1["config.json"],
    "tokenizer.json": b'{"vocab": 7}',
}


def trusted_serial(root: Path) -> int:
    doc = json.loads((root / ".kensho" / "trusted-manifest.json").read_bytes())
    return int(doc["signed"]["serial"])


def stat_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


async def test_prefetch_fetches_only_the_change_and_never_touches_served_files(
    tmp_path: Path,
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    m2 = release(V2, 2)
    served_before = stat_of(tmp_path / "w.bin")
    seen = Recorder()
    with http_server(V2) as (url, state):
        store = manager(tmp_path, [http(url)])
        result = await Prefetcher(store, emit=seen).stage(m2)
        await store.aclose()
        fetched = state.bytes_served
    assert result.outcome == "staged"
    assert fetched <= CHUNK + len(V2["tokenizer.json"]), "more than the changed bytes"
    assert result.fetched == fetched
    # The running release is untouched: same files, same inodes, still trusted.
    assert stat_of(tmp_path / "w.bin") == served_before
    assert (tmp_path / "w.bin").read_bytes() == OLD
    assert not (tmp_path / "tokenizer.json").exists()
    assert trusted_serial(tmp_path) == 1
    progress = seen.of(ReleasePrefetchProgress)
    assert progress and progress[-1].done == progress[-1].total == fetched
    assert [e.serial for e in seen.of(ReleaseStaged)] == [2]
    staging = Staging(store.state)
    complete = staging.complete()
    assert complete is not None and complete.serial == 2

    # The origin is gone: the apply needs no network.
    offline = manager(tmp_path, [])
    applied = Recorder()
    assert await apply_staged(offline, how="boot", emit=applied) is not None
    await offline.aclose()
    for rel, data in V2.items():
        assert (tmp_path / rel).read_bytes() == data, rel
    assert trusted_serial(tmp_path) == 2
    assert [(e.serial, e.previous_serial, e.how) for e in applied.of(ReleaseApplied)] == [
        (2, 1, "boot")
    ]
    assert staging.manifest() is None and list(staging.dir.glob("*.part")) == []
    assert list((tmp_path / ".kensho" / "tmp").glob("*.part")) == []


async def test_a_source_gone_mid_prefetch_keeps_what_verified_and_resumes(
    tmp_path: Path,
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    new = os.urandom(40 * CHUNK)
    v2 = {**V1, "w.bin": new + OLD[40 * CHUNK :]}
    m2 = release(v2, 2)
    seen = Recorder()
    with http_server(v2, pause_after=16 * CHUNK) as (url, state):
        store = manager(tmp_path, [http(url)])
        task = asyncio.ensure_future(Prefetcher(store, emit=seen).stage(m2))
        await asyncio.to_thread(state.paused.wait, 20)
        # The origin disappears mid-transfer (the handler ends without the rest).
        state.stopping.set()
        state.resume.set()
        result = await task
        await store.aclose()
    assert result.outcome == "stopped"
    stopped = seen.of(ReleasePrefetchStopped)
    assert [s.reason for s in stopped] == ["source"]
    assert trusted_serial(tmp_path) == 1 and (tmp_path / "w.bin").read_bytes() == OLD
    with http_server(v2) as (url, state):
        store = manager(tmp_path, [http(url)])
        again = await Prefetcher(store, emit=Recorder()).stage(m2)
        await store.aclose()
        resumed = state.bytes_served
    assert again.outcome == "staged"
    assert resumed <= 40 * CHUNK - 16 * CHUNK + CHUNK, "verified staged chunks were fetched again"


async def test_a_full_disk_stops_staging_with_a_clear_event(tmp_path: Path) -> None:
    await install(tmp_path, V1, release(V1, 1))
    seen = Recorder()
    with http_server(V2) as (url, state):
        store = manager(tmp_path, [http(url)], disk_free=lambda _: 1024 * 1024)
        result = await Prefetcher(store, emit=seen).stage(release(V2, 2))
        await store.aclose()
        assert state.bytes_served == 0
    assert result.outcome == "stopped"
    (stopped,) = seen.of(ReleasePrefetchStopped)
    assert stopped.reason == "disk_full" and "bytes are free" in stopped.detail
    assert (tmp_path / "w.bin").read_bytes() == OLD and trusted_serial(tmp_path) == 1


async def test_a_staged_manifest_altered_on_disk_is_refused_at_apply(tmp_path: Path) -> None:
    await install(tmp_path, V1, release(V1, 1))
    with http_server(V2) as (url, _):
        store = manager(tmp_path, [http(url)])
        await Prefetcher(store, emit=Recorder()).stage(release(V2, 2))
        await store.aclose()
    staging = Staging(store.state)
    doc = json.loads(staging.manifest_path.read_bytes())
    doc["signed"]["version"] = "9.9"  # same files, a forged field: signatures break
    forged = json.dumps(doc).encode()
    staging.manifest_path.write_bytes(forged)
    staging.complete_path.write_bytes(manifest_digest(parse_manifest(forged)).encode())
    offline = manager(tmp_path, [])
    seen = Recorder()
    with pytest.raises(SignatureError):
        await apply_staged(offline, how="boot", emit=seen)
    await offline.aclose()
    assert [e.target_serial for e in seen.of(ReleaseApplyFailed)] == [2]
    assert (tmp_path / "w.bin").read_bytes() == OLD and trusted_serial(tmp_path) == 1


async def test_nothing_staged_applies_nothing(tmp_path: Path) -> None:
    await install(tmp_path, V1, release(V1, 1))
    store = manager(tmp_path, [])
    assert await apply_staged(store, how="boot", emit=Recorder()) is None
    await store.aclose()
    assert trusted_serial(tmp_path) == 1


async def test_rate_limiter_spaces_deliveries_on_virtual_time() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(1000, monotonic=lambda: now[0], sleep=sleep)
    for _ in range(5):
        await limiter.take(1000)
    # The bucket starts full (one second's worth): 5000 bytes take 4 s at 1000 B/s.
    assert sum(slept) == pytest.approx(4.0)
    unlimited = RateLimiter(0, monotonic=lambda: now[0], sleep=sleep)
    await unlimited.take(10**9)
    assert sum(slept) == pytest.approx(4.0)


async def test_prefetch_through_a_peer_listed_first_takes_the_new_chunks_from_it(
    tmp_path: Path,
) -> None:
    """One store already applied release 2 and shares it; the other stages it through
    that peer, listed before the origin: the origin serves none of the new bytes."""
    m1, m2 = release(V1, 1), release(V2, 2)
    await install(tmp_path / "applied", V2, m2)
    await install(tmp_path / "behind", V1, m1)
    with share_server(tmp_path / "applied") as (peer_url, service), http_server(V2) as (url, st):
        peer = source_from_string(peer_url)
        assert isinstance(peer, PeerSource)
        peer.know(m1)  # what the boot's repair told it: the running release
        store = manager(tmp_path / "behind", [peer, http(url)])
        result = await Prefetcher(store, emit=Recorder()).stage(m2)
        await store.aclose()
        assert st.bytes_served == 0 and st.requests == [], "the origin was asked"
        assert service.served_bytes == CHUNK + len(V2["tokenizer.json"])
    assert result.outcome == "staged" and result.fetched == CHUNK + len(V2["tokenizer.json"])
    assert peer.abandoned is None
    async with manager(tmp_path / "behind", []) as offline:
        assert await apply_staged(offline, how="boot", emit=Recorder()) is not None
    for rel, data in V2.items():
        assert (tmp_path / "behind" / rel).read_bytes() == data, rel
