"""StorageManager end to end on real files, with memory, mirror and HTTP sources."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import orjson
import pytest

from _storage_support import FullDisk, http_server, kensho, manifest_for, write_tree
from kensho.errors import DiskSpaceError, IntegrityError, ManifestError, SourceError
from kensho.events import (
    Event,
    StorageChunkRejected,
    StorageFileChecked,
    StorageLockWaiting,
    StorageReady,
    StorageSourceFailed,
)
from kensho.hub import EventHub
from kensho.storage import (
    HttpSource,
    Manifest,
    MemorySource,
    MirrorSource,
    PartWriter,
    Source,
    StorageManager,
    StoreBusyError,
    dump_manifest,
)
from kensho.storage._assemble import MAX_FILES_IN_FLIGHT
from kensho.storage._lock import StoreLock
from kensho.storage.sources import Sink, SourceUnreachableError
from kensho.telemetry.testing import capture_logs

CHUNK = 4096
FILES = {
    "models/w.bin": os.urandom(10 * CHUNK + 100),
    "tok.json": b'{"vocab": 3}',
    "docs/guide.md": b"# guide\n" * 50,
}


def http(url: str, **kw: float) -> HttpSource:
    opts: dict[str, float] = {"wait_initial": 0.01, "wait_max": 0.05, "wait_jitter": 0.0}
    opts.update(kw)
    return HttpSource(url, **opts)  # type: ignore[arg-type]


async def drain(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


def checked(events: Sequence[Event]) -> dict[str, StorageFileChecked]:
    return {e.path: e for e in events if isinstance(e, StorageFileChecked)}


async def sync(
    root: Path, manifest: Manifest | None, sources: Sequence[Source], **kw: object
) -> tuple[StorageManager, list[Event]]:
    manager = StorageManager(root, manifest, sources, **kw)  # type: ignore[arg-type]
    try:
        events = await drain(manager.initialize_and_verify())
    finally:
        await manager.aclose()
    return manager, events


def assert_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel


async def test_empty_store_is_filled_from_memory(tmp_path: Path) -> None:
    manifest = manifest_for(FILES, CHUNK)
    source = MemorySource(FILES)
    manager, events = await sync(tmp_path, manifest, [source])
    assert_tree(tmp_path, FILES)
    assert {e.status for e in checked(events).values()} == {"missing"}
    assert isinstance(events[-1], StorageReady) and events[-1].state == "ok"
    assert manager.report is not None and manager.report.ok
    assert source.bytes_served == sum(map(len, FILES.values()))
    assert (tmp_path / ".kensho" / "trusted-manifest.json").is_file()
    assert list((tmp_path / ".kensho" / "tmp").iterdir()) == []


async def test_flipped_byte_in_middle_chunk_fetches_only_that_chunk(tmp_path: Path) -> None:
    write_tree(tmp_path, FILES)
    w = tmp_path / "models/w.bin"
    data = bytearray(w.read_bytes())
    data[5 * CHUNK + 17] ^= 1
    w.write_bytes(data)
    with http_server(FILES) as (url, state):
        _, events = await sync(tmp_path, manifest_for(FILES, CHUNK), [http(url)])
    report = checked(events)["models/w.bin"]
    assert report.status == "corrupt" and report.bad_chunks == (5,)
    assert state.bytes_served == CHUNK
    assert state.requests == [("models/w.bin", f"bytes={5 * CHUNK}-{6 * CHUNK - 1}")]
    assert_tree(tmp_path, FILES)


async def test_truncated_file_fetches_only_the_tail(tmp_path: Path) -> None:
    write_tree(tmp_path, FILES)
    w = tmp_path / "models/w.bin"
    w.write_bytes(FILES["models/w.bin"][: 7 * CHUNK + 5])
    source = MemorySource(FILES)
    _, events = await sync(tmp_path, manifest_for(FILES, CHUNK), [source])
    report = checked(events)["models/w.bin"]
    assert report.status == "wrong_size" and report.bad_chunks == (7, 8, 9, 10)
    assert source.requests == [("models/w.bin", 7 * CHUNK, 3 * CHUNK + 100)]
    assert_tree(tmp_path, FILES)


async def test_longer_file_is_wrong_size_and_repaired(tmp_path: Path) -> None:
    write_tree(tmp_path, {**FILES, "tok.json": FILES["tok.json"] + b"junk"})
    _, events = await sync(tmp_path, manifest_for(FILES, CHUNK), [MemorySource(FILES)])
    assert checked(events)["tok.json"].status == "wrong_size"
    assert_tree(tmp_path, FILES)


async def test_missing_and_unexpected_files(tmp_path: Path) -> None:
    write_tree(tmp_path, {k: v for k, v in FILES.items() if k != "tok.json"})
    write_tree(tmp_path, {"extra/notes.txt": b"mine"})
    source = MemorySource(FILES)
    _, events = await sync(tmp_path, manifest_for(FILES, CHUNK), [source])
    found = checked(events)
    assert found["tok.json"].status == "missing"
    assert found["extra/notes.txt"].status == "unexpected"
    assert (tmp_path / "extra/notes.txt").read_bytes() == b"mine"
    assert source.requests == [("tok.json", 0, len(FILES["tok.json"]))]


async def test_fast_path_trusts_stat_records_until_the_file_changes(tmp_path: Path) -> None:
    write_tree(tmp_path, FILES)
    manifest = manifest_for(FILES, CHUNK)
    async with StorageManager(tmp_path, manifest) as manager:
        first = checked(await drain(manager.verify()))
        second = checked(await drain(manager.verify()))
        assert not any(e.fast for e in first.values())
        assert all(e.fast and e.status == "ok" for e in second.values())
        # Same size, new content: stat changes, so the fast path does not vouch for it.
        w = tmp_path / "models/w.bin"
        data = bytearray(w.read_bytes())
        data[0] ^= 1
        w.write_bytes(data)
        third = checked(await drain(manager.verify()))
        assert third["models/w.bin"].status == "corrupt" and not third["models/w.bin"].fast
        assert third["tok.json"].fast
        full = checked(await drain(manager.verify(full=True)))
        assert not any(e.fast for e in full.values())
        assert full["models/w.bin"].bad_chunks == (0,)


async def test_mirror_folder_source(tmp_path: Path) -> None:
    mirror, root = tmp_path / "usb", tmp_path / "store"
    write_tree(mirror, FILES)
    await sync(root, manifest_for(FILES, CHUNK), [MirrorSource(mirror.as_uri())])
    assert_tree(root, FILES)


async def test_failover_to_next_source(tmp_path: Path) -> None:
    mirror = tmp_path / "usb"
    write_tree(mirror, FILES)
    root = tmp_path / "store"
    with http_server({}) as (url, _):  # knows no file: 404
        _, events = await sync(
            root,
            manifest_for(FILES, CHUNK),
            [MirrorSource(tmp_path / "gone"), http(url), MirrorSource(mirror)],
        )
    failed = [e for e in events if isinstance(e, StorageSourceFailed)]
    assert {e.source for e in failed} == {str(tmp_path / "gone"), url}
    assert_tree(root, FILES)


async def test_http_503_twice_then_ok(tmp_path: Path) -> None:
    with http_server(FILES, fail_first=2) as (url, state):
        await sync(tmp_path, manifest_for(FILES, CHUNK), [http(url)])
    assert state.statuses.count(503) == 2
    assert_tree(tmp_path, FILES)


async def test_wrong_bytes_are_retried_then_next_source(tmp_path: Path) -> None:
    with http_server(FILES, corrupt=True) as (url, state):
        _, events = await sync(
            tmp_path,
            manifest_for({"tok.json": FILES["tok.json"]}, CHUNK),
            [http(url), MemorySource(FILES)],
        )
    rejected = [e for e in events if isinstance(e, StorageChunkRejected)]
    assert [e.attempt for e in rejected] == [1, 2, 3]
    assert len(state.requests) == 3
    assert (tmp_path / "tok.json").read_bytes() == FILES["tok.json"]


async def test_wrong_bytes_only_never_place_a_bad_file(tmp_path: Path) -> None:
    with http_server(FILES, corrupt=True) as (url, _), pytest.raises(IntegrityError) as info:
        await sync(tmp_path, manifest_for(FILES, CHUNK), [http(url)])
    assert set(info.value.problems) == set(FILES)
    assert "wrong bytes" in info.value.problems["tok.json"]
    for rel in FILES:
        assert not (tmp_path / rel).exists()


async def test_hanging_server_times_out_and_fails_over(tmp_path: Path) -> None:
    with http_server(FILES, hang=True) as (url, _):
        _, events = await sync(
            tmp_path,
            manifest_for({"tok.json": FILES["tok.json"]}, CHUNK),
            [http(url, read_timeout=0.2, attempts=1), MemorySource(FILES)],
        )
    assert any(isinstance(e, StorageSourceFailed) and "stopped sending" in e.error for e in events)
    assert (tmp_path / "tok.json").read_bytes() == FILES["tok.json"]


async def test_offline_boot_from_trusted_manifest(tmp_path: Path) -> None:
    await sync(tmp_path, manifest_for(FILES, CHUNK), [MemorySource(FILES)])
    manager, events = await sync(tmp_path, None, [])
    ready = events[-1]
    assert isinstance(ready, StorageReady) and ready.state == "ok" and ready.offline
    assert manager.report is not None and manager.report.ok


async def test_no_manifest_at_all_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest given") as caught:
        await sync(tmp_path, None, [])
    assert f"kensho manifest build {tmp_path} -o manifest.json" in str(caught.value)


async def test_optional_file_unreachable_means_degraded(tmp_path: Path) -> None:
    write_tree(tmp_path, {k: v for k, v in FILES.items() if k != "docs/guide.md"})
    manifest = manifest_for(FILES, CHUNK, optional=("docs/guide.md",))
    _, events = await sync(tmp_path, manifest, [MirrorSource(tmp_path / "unplugged")])
    ready = events[-1]
    assert isinstance(ready, StorageReady)
    assert ready.state == "degraded" and ready.degraded == ("docs/guide.md",) and ready.offline


async def test_required_file_unrepairable_raises_listing_it(tmp_path: Path) -> None:
    write_tree(tmp_path, {k: v for k, v in FILES.items() if k != "tok.json"})
    with pytest.raises(IntegrityError) as info:
        await sync(tmp_path, manifest_for(FILES, CHUNK), [])
    assert list(info.value.problems) == ["tok.json"]
    assert "no source" in str(info.value)


async def test_disk_space_precheck_writes_nothing(tmp_path: Path) -> None:
    write_tree(tmp_path, {"tok.json": FILES["tok.json"]})  # good files count as zero
    manifest = manifest_for(FILES, CHUNK)
    need = len(FILES["models/w.bin"]) + len(FILES["docs/guide.md"])
    with pytest.raises(DiskSpaceError) as info:
        await sync(
            tmp_path, manifest, [MemorySource(FILES)], disk_free=lambda _: need, space_margin=1
        )
    assert info.value.needed == need + 1 and info.value.free == need
    assert "only" in str(info.value) and "free" in str(info.value)
    assert not (tmp_path / "models").exists()
    tmp = tmp_path / ".kensho" / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "reached"),
    [("corrupt", "write"), ("missing", "write_pieces")],
    ids=["local-copy", "fetched"],
)
async def test_enospc_during_write_keeps_old_file(
    tmp_path: Path, damage: str, reached: str
) -> None:
    """A full disk fails the repair with a DiskSpaceError naming the file, whether the
    failing write is a chunk copied from the damaged file or one fetched (the file
    is missing); the final path keeps what it had and no partial file is left."""
    write_tree(tmp_path, FILES)
    w = tmp_path / "models/w.bin"
    old = bytearray(FILES["models/w.bin"])
    old[3 * CHUNK] ^= 1
    if damage == "corrupt":
        w.write_bytes(old)
    else:
        w.unlink()
    disk = FullDisk()
    with pytest.raises(DiskSpaceError, match=r"disk filled up while writing models/w\.bin"):
        await sync(tmp_path, manifest_for(FILES, CHUNK), [MemorySource(FILES)], part_writer=disk)
    assert disk.calls[0] == reached
    if damage == "corrupt":
        assert w.read_bytes() == bytes(old)
    else:
        assert not w.exists()
    assert list((tmp_path / ".kensho" / "tmp").glob("*.part")) == []


async def test_symlinked_folder_leaving_root_is_never_used(tmp_path: Path) -> None:
    outside, root = tmp_path / "outside", tmp_path / "store"
    outside.mkdir()
    root.mkdir()
    (root / "models").symlink_to(outside)
    with pytest.raises(IntegrityError) as info:
        await sync(root, manifest_for(FILES, CHUNK), [MemorySource(FILES)])
    assert "models/w.bin" in info.value.problems
    assert "outside the store root" in info.value.problems["models/w.bin"]
    assert list(outside.iterdir()) == []


async def test_symlink_at_final_path_is_replaced_not_followed(tmp_path: Path) -> None:
    secret, root = tmp_path / "secret.txt", tmp_path / "store"
    secret.write_bytes(b"do not touch")
    write_tree(root, FILES)
    (root / "tok.json").unlink()
    (root / "tok.json").symlink_to(secret)
    _, events = await sync(root, manifest_for(FILES, CHUNK), [MemorySource(FILES)])
    assert checked(events)["tok.json"].status == "corrupt"
    assert not (root / "tok.json").is_symlink()
    assert (root / "tok.json").read_bytes() == FILES["tok.json"]
    assert secret.read_bytes() == b"do not touch"


class _CutSource:
    """Delivers ``limit`` bytes, then drops as if the network went away."""

    name = "flaky"

    def __init__(self, files: dict[str, bytes], limit: int) -> None:
        self.files, self.limit = files, limit

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        data = self.files[path][offset : offset + length]
        await sink(data[: self.limit])
        raise SourceUnreachableError("network went away")

    async def aclose(self) -> None:
        return None


async def test_interrupted_download_resumes_from_verified_chunks(tmp_path: Path) -> None:
    files = {"models/w.bin": FILES["models/w.bin"]}
    manifest = manifest_for(files, CHUNK)
    with pytest.raises(IntegrityError):
        await sync(tmp_path, manifest, [_CutSource(files, 6 * CHUNK + 10)])
    assert not (tmp_path / "models/w.bin").exists()
    source = MemorySource(files)
    await sync(tmp_path, manifest, [source])
    assert source.requests == [("models/w.bin", 6 * CHUNK, 4 * CHUNK + 100)]
    assert_tree(tmp_path, files)


async def test_no_wait_fails_fast_when_locked(tmp_path: Path) -> None:
    (tmp_path / ".kensho").mkdir()
    other = StoreLock(tmp_path / ".kensho" / "lock")
    assert other.try_acquire()
    try:
        async with StorageManager(
            tmp_path, manifest_for(FILES, CHUNK), [MemorySource(FILES)]
        ) as manager:
            with pytest.raises(StoreBusyError, match="another Kensho process"):
                await drain(manager.initialize_and_verify(wait=False))
    finally:
        other.release()
    assert not (tmp_path / "tok.json").exists()


async def test_waiting_for_the_lock_says_so(tmp_path: Path) -> None:
    (tmp_path / ".kensho").mkdir()
    other = StoreLock(tmp_path / ".kensho" / "lock")
    assert other.try_acquire()
    manager = StorageManager(tmp_path, manifest_for(FILES, CHUNK), [MemorySource(FILES)])
    try:
        stream = manager.initialize_and_verify()
        async for event in stream:
            if isinstance(event, StorageLockWaiting):
                other.release()
        assert_tree(tmp_path, FILES)
    finally:
        await manager.aclose()


async def test_source_error_type_is_public() -> None:
    assert issubclass(SourceUnreachableError, SourceError)


async def test_verify_never_creates_the_root(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    async with StorageManager(root, manifest_for(FILES, CHUNK)) as manager:
        events = await drain(manager.verify())
    assert {e.status for e in checked(events).values()} == {"missing"}
    assert not root.exists()


async def test_repair_alone_fixes_and_records(tmp_path: Path) -> None:
    async with StorageManager(
        tmp_path, manifest_for(FILES, CHUNK), [MemorySource(FILES)]
    ) as manager:
        await drain(manager.repair())
        assert manager.report is not None and manager.report.ok
        again = checked(await drain(manager.verify()))
    assert all(e.fast for e in again.values())
    assert_tree(tmp_path, FILES)


async def test_events_are_json_data_and_failures_are_logged(tmp_path: Path) -> None:
    with capture_logs() as logs:
        _, events = await sync(
            tmp_path,
            manifest_for(FILES, CHUNK),
            [MirrorSource(tmp_path / "gone"), MemorySource(FILES)],
        )
    for event in events:
        data = orjson.loads(orjson.dumps(event.to_dict()))
        assert data["kind"] == event.kind and data["message"]
    failed = [e for e in logs if e["event"] == "source failed"]
    assert failed and failed[0]["service"] == "storage" and failed[0]["level"] == "warning"


async def test_repair_facts_are_logged_once_by_the_hub_listener(tmp_path: Path) -> None:
    """Repaired, failed and ready are logged by the hub's log listener, once each,
    under ``storage`` with the names and fields log readers match; a hub without that
    listener logs none of them (no component logs them by hand beside emitting)."""
    write_tree(tmp_path, FILES)
    w = tmp_path / "models/w.bin"
    broken = bytearray(FILES["models/w.bin"])
    broken[2 * CHUNK] ^= 1
    w.write_bytes(broken)
    (tmp_path / "docs/guide.md").unlink()
    manifest = manifest_for(FILES, CHUNK, optional=("docs/guide.md",))
    source = MemorySource({k: v for k, v in FILES.items() if k != "docs/guide.md"})
    with capture_logs() as logs:
        await sync(tmp_path, manifest, [source])
    named = [(e["event"], e["service"], e["level"]) for e in logs if e.get("service") == "storage"]
    assert named.count(("file repaired", "storage", "info")) == 1, named
    assert named.count(("repair failed", "storage", "warning")) == 1, named
    assert named.count(("store ready", "storage", "info")) == 1, named
    repaired = next(e for e in logs if e["event"] == "file repaired")
    assert (repaired["path"], repaired["fetched"], repaired["status"]) == (
        "models/w.bin",
        CHUNK,
        "storage.file.repaired",
    )
    assert repaired["reused"] == len(FILES["models/w.bin"]) - CHUNK
    failed = next(e for e in logs if e["event"] == "repair failed")
    assert failed["path"] == "docs/guide.md" and failed["reason"]
    ready = next(e for e in logs if e["event"] == "store ready")
    assert (ready["state"], ready["offline"], ready["degraded"]) == (
        "degraded",
        False,
        ["docs/guide.md"],
    )

    w.write_bytes(broken)
    with capture_logs() as quiet:
        await sync(tmp_path, manifest, [source], hub=EventHub(log_events=False))
    assert w.read_bytes() == FILES["models/w.bin"]  # repaired again, silently
    said = {e["event"] for e in quiet}
    assert not said & {"file repaired", "repair failed", "store ready"}, said


async def test_garbage_state_database_only_costs_a_rehash(tmp_path: Path) -> None:
    write_tree(tmp_path, FILES)
    (tmp_path / ".kensho").mkdir()
    (tmp_path / ".kensho" / "state.db").write_bytes(b"this is not sqlite" * 100)
    async with StorageManager(tmp_path, manifest_for(FILES, CHUNK)) as manager:
        found = checked(await drain(manager.verify()))
    assert all(e.status == "ok" and not e.fast for e in found.values())


async def test_cancelled_wait_for_the_lock_leaves_it_free(tmp_path: Path) -> None:
    (tmp_path / ".kensho").mkdir()
    holder = StoreLock(tmp_path / ".kensho" / "lock")
    assert holder.try_acquire()
    waiter = StoreLock(tmp_path / ".kensho" / "lock")
    task = asyncio.create_task(waiter.acquire())
    await asyncio.sleep(0)  # let it start waiting (no timing assumption: it cannot win)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    holder.release()
    third = StoreLock(tmp_path / ".kensho" / "lock")
    await third.acquire()
    third.release()


async def test_stale_partial_files_are_dropped(tmp_path: Path) -> None:
    tmp = tmp_path / ".kensho" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / ("0" * 32 + ".part")).write_bytes(b"left by a file no longer in the manifest")
    await sync(tmp_path, manifest_for(FILES, CHUNK), [MemorySource(FILES)])
    assert list(tmp.iterdir()) == []


async def test_server_ignoring_range_still_repairs_one_chunk(tmp_path: Path) -> None:
    write_tree(tmp_path, FILES)
    w = tmp_path / "models/w.bin"
    data = bytearray(FILES["models/w.bin"])
    data[8 * CHUNK] ^= 1
    w.write_bytes(data)
    with http_server(FILES, ignore_range=True) as (url, state):
        _, events = await sync(tmp_path, manifest_for(FILES, CHUNK), [http(url)])
    assert checked(events)["models/w.bin"].bad_chunks == (8,)
    assert state.statuses == [200]
    assert_tree(tmp_path, FILES)


async def test_cancelled_repair_never_closes_a_file_a_thread_still_writes(
    tmp_path: Path,
) -> None:
    """Cancellation waits for copy threads: a closed fd number could be reused by
    another file (the state database) and receive model bytes."""
    import threading

    data = os.urandom(8 * 4096)
    files = {"w.bin": data}
    write_tree(tmp_path, files)
    broken = bytearray(data)
    broken[5 * 4096] ^= 0xFF  # chunk 5 bad: the other 7 are copied from the old file
    (tmp_path / "w.bin").write_bytes(bytes(broken))
    entered, release = threading.Event(), threading.Event()
    fd_alive: list[bool] = []

    class SlowDisk(PartWriter):
        """The first write (a local copy's, on its thread) blocks until released."""

        def write(self, fd: int, data: bytes | memoryview, offset: int) -> None:
            if not entered.is_set():
                entered.set()
                release.wait(10)
                try:
                    os.fstat(fd)
                    fd_alive.append(True)
                except OSError:
                    fd_alive.append(False)
            super().write(fd, data, offset)

    manager = StorageManager(
        tmp_path, manifest_for(files, 4096), [MemorySource(files)], part_writer=SlowDisk()
    )

    async def run() -> None:
        async for _ in manager.repair():
            pass

    task = asyncio.create_task(run())
    await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    for _ in range(50):  # let the cancellation travel as far as it would go
        await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await manager.aclose()
    assert fd_alive and all(fd_alive)


@pytest.mark.parametrize("link", [".kensho", ".kensho/tmp"])
def test_state_folder_leading_outside_the_root_is_refused_before_writing(
    tmp_path: Path, link: str
) -> None:
    """``kensho sync`` and ``verify`` refuse (exit 10, naming the link) a state folder
    that is a symlink out of the root; nothing is written there or in the root."""
    source, root, outside = tmp_path / "src", tmp_path / "store", tmp_path / "outside"
    write_tree(source, FILES)
    manifest = tmp_path / "m.json"
    manifest.write_bytes(dump_manifest(manifest_for(FILES, CHUNK)))
    outside.mkdir()
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(outside, target_is_directory=True)
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    for command in (["sync", "-s", source], ["verify"]):
        done = kensho(*command, "-m", manifest, "-r", root, cwd=tmp_path)
        assert done.returncode == 10, done.stdout + done.stderr
        assert f"{root / link} is a symbolic link leading outside the store root" in done.stderr
        assert list(outside.iterdir()) == []
        assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before


async def test_small_files_are_built_many_at_once_on_reused_writer_threads(
    tmp_path: Path,
) -> None:
    """Small files share the ``repair_concurrency`` slots, so more than two are in
    flight once a first file is done, and their bytes go through a few writer threads
    lent from file to file, not one new thread per file."""
    files = {f"small/{i:03d}.bin": os.urandom(3000 + i) for i in range(40)}
    manifest = manifest_for(files, CHUNK)
    first_two = {f.path for f in manifest.files[:2]}
    want = 6

    class Gated(MemorySource):
        """Holds each fetch after the first two until ``want`` are under way at once."""

        active = peak = 0
        gate = asyncio.Event()

        async def fetch(
            self, path: str, offset: int, length: int, file_size: int, sink: Sink
        ) -> None:
            if path in first_two:
                return await super().fetch(path, offset, length, file_size, sink)
            self.active += 1
            self.peak = max(self.peak, self.active)
            if self.active >= want:
                self.gate.set()
            try:
                await asyncio.wait_for(self.gate.wait(), 10)  # two at a time: never
                await super().fetch(path, offset, length, file_size, sink)
            finally:
                self.active -= 1

    writers: set[threading.Thread] = set()

    class Recording(PartWriter):
        def write_pieces(self, fd: int, pieces: list[bytes], offset: int) -> None:
            writers.add(threading.current_thread())
            super().write_pieces(fd, pieces, offset)

    source = Gated(files)
    manager, _ = await sync(tmp_path, manifest, [source], part_writer=Recording())
    assert manager.report is not None and manager.report.ok
    assert_tree(tmp_path, files)
    assert source.peak >= want
    assert len(writers) <= MAX_FILES_IN_FLIGHT < len(files)
