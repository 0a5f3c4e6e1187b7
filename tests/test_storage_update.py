"""Delta updates on real safetensors files, served by a real HTTP server counting bytes."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_safetensors

from _server_support import kensho_popen
from _storage_support import FullDisk, http_server, kensho, signed_for, write_tree
from kensho.errors import DiskSpaceError, IntegrityError, ManifestError, SignatureError
from kensho.events import (
    Event,
    StorageChunkRejected,
    StorageFileChecked,
    StorageFileUpdated,
    StorageReady,
    StorageUpdateFilePlanned,
    StorageUpdateFinished,
    StorageUpdatePlanned,
)
from kensho.storage import (
    DEFAULT_CHUNKING,
    CdcParams,
    Chunking,
    HttpSource,
    Manifest,
    MemorySource,
    MirrorSource,
    PartWriter,
    Source,
    StatRecord,
    StorageManager,
    build_manifest,
    dump_manifest,
)
from kensho.storage._plan import plan_update
from kensho.storage.state import StateStore
from kensho.telemetry.testing import capture_logs

CHUNK = 64 * 1024
CDC = CdcParams.from_sizes(64 * 1024)  # min 16 KiB, max 256 KiB
MODEL = "models/model.safetensors"


def tensors(seed: int, count: int = 6) -> dict[str, np.ndarray]:
    """``count`` float32 tensors of 512 KiB each: a 3 MiB model in 48 fixed chunks."""
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal((512, 256), np.float32) for i in range(count)}


def st_bytes(weights: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    return save_safetensors(dict(weights), metadata=metadata)


def http(url: str) -> HttpSource:
    return HttpSource(url, wait_initial=0.01, wait_max=0.05, wait_jitter=0.0)


async def drain(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


async def publish(
    folder: Path,
    files: Mapping[str, bytes],
    *,
    serial: int,
    chunking: Chunking = "fixed",
    changelog: str = "",
) -> Manifest:
    write_tree(folder, files)
    return await build_manifest(
        folder,
        name="demo",
        version=f"1.{serial}",
        serial=serial,
        chunking=chunking,
        chunk_size=CHUNK if chunking == "fixed" else None,
        cdc=CDC if chunking == "cdc" else None,
        changelog=changelog,
    )


async def install(root: Path, files: Mapping[str, bytes], manifest: Manifest) -> None:
    """A store already synced to ``manifest`` (its trusted manifest)."""
    write_tree(root, files)
    async with StorageManager(root, manifest) as manager:
        await drain(manager.initialize_and_verify())


async def update(
    root: Path, new: Manifest, sources: Sequence[Source], **kw: object
) -> tuple[StorageManager, list[Event]]:
    manager = StorageManager(root, None, sources, **kw)  # type: ignore[arg-type]
    try:
        events = await drain(manager.update(new))
    finally:
        await manager.aclose()
    return manager, events


def changed_span(old: bytes, new: bytes) -> int:
    """Bytes from the first to the last differing byte (one changed region)."""
    n = min(len(old), len(new))
    diff = np.flatnonzero(np.frombuffer(old[:n], np.uint8) != np.frombuffer(new[:n], np.uint8))
    span = int(diff[-1] - diff[0] + 1) if diff.size else 0
    return span + abs(len(new) - len(old))


def trusted_serial(root: Path) -> int:
    doc = json.loads((root / ".kensho" / "trusted-manifest.json").read_bytes())
    return int(doc["signed"]["serial"])


async def scenario(
    tmp_path: Path, old: Mapping[str, bytes], new: Mapping[str, bytes], chunking: Chunking
) -> tuple[Manifest, int, list[tuple[str, str | None]], list[Event]]:
    """Install ``old``, update to ``new`` over HTTP; (manifest, bytes served, requests, events)."""
    m1 = await publish(tmp_path / "v1", old, serial=1, chunking=chunking)
    m2 = await publish(tmp_path / "v2", new, serial=2, chunking=chunking, changelog="retrained")
    root = tmp_path / "store"
    await install(root, old, m1)
    with http_server(new) as (url, server):
        _, events = await update(root, m2, [http(url)])
        served, requests = server.bytes_served, list(server.requests)
    for rel, data in new.items():
        assert (root / rel).read_bytes() == data, rel
    assert trusted_serial(root) == 2
    assert list((root / ".kensho" / "tmp").glob("*.part")) == []
    return m2, served, requests, events


def planned(events: Sequence[Event]) -> dict[str, StorageUpdateFilePlanned]:
    return {e.path: e for e in events if isinstance(e, StorageUpdateFilePlanned)}


@pytest.mark.parametrize("chunking", ["fixed", "cdc"])
async def test_one_changed_tensor_fetches_only_its_chunks(
    tmp_path: Path, chunking: Chunking
) -> None:
    weights = tensors(1)
    old = st_bytes(weights)
    weights["layer3.weight"] = weights["layer3.weight"] * 0.5  # same shape: same header
    new = st_bytes(weights)
    changed = changed_span(old, new)
    assert 0 < changed <= 512 * 1024
    m2, served, requests, events = await scenario(
        tmp_path, {MODEL: old, "config.json": b"{}"}, {MODEL: new, "config.json": b"{}"}, chunking
    )
    entry = m2.file(MODEL)
    assert entry is not None
    biggest = max(c.size for c in entry.chunks)
    plan = planned(events)[MODEL]
    assert served == plan.bytes_to_fetch
    assert changed <= served <= changed + 2 * biggest
    assert plan.bytes_reused == len(new) - served
    # The changed chunks are adjacent: one merged Range request, nothing for config.json.
    assert [path for path, _ in requests] == [MODEL]
    assert requests[0][1] is not None and requests[0][1].startswith("bytes=")
    assert "config.json" not in planned(events)
    (done,) = [e for e in events if isinstance(e, StorageFileUpdated)]
    assert done.fetched == served and done.version == "1.2" and done.changelog == "retrained"


async def test_header_growth_cdc_fetches_little_fixed_fetches_nearly_all(tmp_path: Path) -> None:
    weights = tensors(2)
    old = st_bytes(weights)
    new = st_bytes(weights, metadata={"format": "pt", "note": "fine-tuned on more data"})
    assert len(new) > len(old)  # the header grew: every tensor byte moved
    results = {}
    for chunking in ("fixed", "cdc"):
        m2, served, _, _ = await scenario(tmp_path / chunking, {MODEL: old}, {MODEL: new}, chunking)
        results[chunking] = served
        entry = m2.file(MODEL)
        assert entry is not None
        header = 8 + int.from_bytes(new[:8], "little")
        if chunking == "cdc":
            assert served <= header + 2 * CDC.max
    assert results["fixed"] >= 0.9 * len(new)
    assert results["cdc"] <= 0.2 * len(new)


@pytest.mark.parametrize("chunking", ["fixed", "cdc"])
async def test_appended_data_fetches_the_tail(tmp_path: Path, chunking: Chunking) -> None:
    old = st_bytes(tensors(3, count=4))
    extra = os.urandom(300_000)
    _, served, requests, _ = await scenario(tmp_path, {MODEL: old}, {MODEL: old + extra}, chunking)
    bound = CHUNK if chunking == "fixed" else 2 * CDC.max
    assert len(extra) <= served <= len(extra) + bound
    assert len(requests) == 1


async def test_chunk_reused_from_another_file_and_removed_file_kept(tmp_path: Path) -> None:
    base = os.urandom(16 * CHUNK)
    fresh = os.urandom(CHUNK)
    old = {"a.bin": base, "old/notes.md": b"obsolete"}
    new = {"a.bin": base, "b.bin": base[2 * CHUNK : 6 * CHUNK] + fresh}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    m2 = await publish(tmp_path / "v2", new, serial=2, changelog="adds b.bin")
    root = tmp_path / "store"
    await install(root, old, m1)
    with capture_logs() as logs, http_server(new) as (url, server):
        manager, events = await update(root, m2, [http(url)])
        served, requests = server.bytes_served, list(server.requests)
    assert (root / "b.bin").read_bytes() == new["b.bin"]
    assert served == CHUNK  # the four chunks found in a.bin cost nothing
    assert requests == [("b.bin", f"bytes={4 * CHUNK}-{5 * CHUNK - 1}")]
    plan = planned(events)
    assert plan["b.bin"].action == "added" and plan["b.bin"].bytes_reused == 4 * CHUNK
    assert plan["old/notes.md"].action == "removed"
    # Removed from the manifest: left in place, reported as unexpected, never deleted.
    assert (root / "old/notes.md").read_bytes() == b"obsolete"
    statuses = {e.path: e.status for e in events if isinstance(e, StorageFileChecked)}
    assert statuses["old/notes.md"] == "unexpected"
    assert manager.report is not None and manager.report.ok
    updated = [e for e in logs if e["event"] == "file updated"]
    assert updated[0]["path"] == "b.bin" and updated[0]["changelog"] == "adds b.bin"
    assert updated[0]["version"] == "1.2"
    assert any(e["event"] == "update planned" and e["path"] == "b.bin" for e in logs)
    for event in events:
        data = orjson.loads(orjson.dumps(event.to_dict()))
        assert data["kind"] == event.kind and data["message"]
    assert isinstance(events[-1], StorageUpdateFinished) and events[-1].serial == 2


async def test_dry_run_streams_the_plan_and_changes_nothing(tmp_path: Path) -> None:
    weights = tensors(4)
    old = st_bytes(weights)
    weights["layer0.weight"] = weights["layer0.weight"] + 1
    new = st_bytes(weights)
    m1 = await publish(tmp_path / "v1", {MODEL: old}, serial=1)
    m2 = await publish(tmp_path / "v2", {MODEL: new}, serial=2)
    root = tmp_path / "store"
    await install(root, {MODEL: old}, m1)
    before = (root / MODEL).stat()
    trusted = (root / ".kensho" / "trusted-manifest.json").read_bytes()
    with http_server({MODEL: new}) as (url, server):
        async with StorageManager(root, None, [http(url)]) as manager:
            events = await drain(manager.update(m2, dry_run=True))
        assert server.bytes_served == 0 and server.requests == []
    kinds = [type(e) for e in events]
    assert kinds == [StorageUpdateFilePlanned, StorageUpdatePlanned]
    total = events[-1]
    assert isinstance(total, StorageUpdatePlanned) and total.dry_run
    differing = sum(
        len(new[i : i + CHUNK])
        for i in range(0, len(new), CHUNK)
        if new[i : i + CHUNK] != old[i : i + CHUNK]
    )
    assert total.bytes_to_fetch == differing and total.bytes_reused == len(new) - differing
    assert manager.plan is not None and manager.plan.bytes_to_fetch == total.bytes_to_fetch
    after = (root / MODEL).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (root / MODEL).read_bytes() == old
    assert (root / ".kensho" / "trusted-manifest.json").read_bytes() == trusted
    tmp = root / ".kensho" / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


async def test_disk_precheck_counts_only_the_files_to_assemble(tmp_path: Path) -> None:
    big = os.urandom(32 * CHUNK)  # unchanged: needs no space
    old = {"big.bin": big, "small.bin": os.urandom(4 * CHUNK)}
    new = {"big.bin": big, "small.bin": os.urandom(5 * CHUNK)}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    m2 = await publish(tmp_path / "v2", new, serial=2)
    root = tmp_path / "store"
    await install(root, old, m1)
    need = 5 * CHUNK
    with http_server(new) as (url, server):
        with pytest.raises(DiskSpaceError) as info:
            await update(root, m2, [http(url)], disk_free=lambda _: need, space_margin=1)
        assert info.value.needed == need + 1 and info.value.free == need
        assert "small.bin" not in str(info.value) and "free some space" in str(info.value)
        assert server.requests == []
        assert (root / "small.bin").read_bytes() == old["small.bin"]
        tmp = root / ".kensho" / "tmp"
        assert not tmp.exists() or list(tmp.glob("*.part")) == []
        await update(root, m2, [http(url)], disk_free=lambda _: need + 1, space_margin=1)
    assert (root / "small.bin").read_bytes() == new["small.bin"]


async def test_disk_filling_up_mid_update_keeps_the_old_release(tmp_path: Path) -> None:
    """The one write path of the build layer fails with ENOSPC: the update stops with a
    DiskSpaceError naming the file, every old file stays, no partial file is left.

    The new file is made only of chunks a local file holds, so the failing write is
    the local copy's (no source is given): the build layer's writer seam reaches it.
    """
    old = {"a.bin": os.urandom(4 * CHUNK)}
    new = {"a.bin": old["a.bin"], "b.bin": old["a.bin"][CHUNK:]}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    m2 = await publish(tmp_path / "v2", new, serial=2)
    root = tmp_path / "store"
    await install(root, old, m1)
    trusted = (root / ".kensho" / "trusted-manifest.json").read_bytes()

    disk = FullDisk()
    with pytest.raises(DiskSpaceError, match=r"disk filled up while writing b\.bin") as info:
        await update(root, m2, [], part_writer=disk)
    assert disk.calls[0] == "write"  # the local copy's write, through the seam
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert (root / "a.bin").read_bytes() == old["a.bin"]
    assert not (root / "b.bin").exists()
    assert (root / ".kensho" / "trusted-manifest.json").read_bytes() == trusted
    assert list((root / ".kensho" / "tmp").glob("*.part")) == []


async def test_wrong_bytes_are_rejected_then_the_next_source_used(tmp_path: Path) -> None:
    weights = tensors(5, count=3)
    old = st_bytes(weights)
    weights["layer1.weight"] = -weights["layer1.weight"]
    new = st_bytes(weights)
    m1 = await publish(tmp_path / "v1", {MODEL: old}, serial=1)
    m2 = await publish(tmp_path / "v2", {MODEL: new}, serial=2)
    root = tmp_path / "store"
    await install(root, {MODEL: old}, m1)
    with http_server({MODEL: new}, corrupt=True) as (bad_url, _):
        # Only a lying source: the update stops, nothing is placed, serial 1 stays.
        with pytest.raises(IntegrityError, match="still holds serial 1"):
            await update(root, m2, [http(bad_url)])
        assert (root / MODEL).read_bytes() == old and trusted_serial(root) == 1
        with http_server({MODEL: new}) as (good_url, good):
            _, events = await update(root, m2, [http(bad_url), http(good_url)])
            assert 0 < good.bytes_served <= 512 * 1024 + 2 * CHUNK
    assert any(isinstance(e, StorageChunkRejected) for e in events)
    assert (root / MODEL).read_bytes() == new and trusted_serial(root) == 2


async def test_local_chunk_changed_since_the_manifest_is_fetched_instead(
    tmp_path: Path,
) -> None:
    base = os.urandom(8 * CHUNK)
    old = {"a.bin": base}
    new = {"a.bin": base + b"tail"}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    m2 = await publish(tmp_path / "v2", new, serial=2)
    root = tmp_path / "store"
    await install(root, old, m1)
    damaged = bytearray(base)
    damaged[3 * CHUNK + 5] ^= 1  # chunk 3 no longer holds what the manifest says
    (root / "a.bin").write_bytes(damaged)
    with http_server(new) as (url, server):
        await update(root, m2, [http(url)])
        ranges = sorted(r for _, r in server.requests)
    assert (root / "a.bin").read_bytes() == new["a.bin"]
    assert ranges == [f"bytes={3 * CHUNK}-{4 * CHUNK - 1}", f"bytes={8 * CHUNK}-{8 * CHUNK + 3}"]
    # Planned again (a resumed run): the file's fresh record says it is already done.
    state = StateStore(root)
    try:
        again = plan_update(root, m1, m2, state.records())
    finally:
        state.close()
    assert again.files == () and again.done == ("a.bin",)


async def test_expired_manifest_never_updates(tmp_path: Path) -> None:
    old, new = {"a.bin": os.urandom(2 * CHUNK)}, {"a.bin": os.urandom(2 * CHUNK)}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    write_tree(tmp_path / "v2", new)
    m2 = await build_manifest(
        tmp_path / "v2",
        name="demo",
        version="2",
        serial=2,
        chunk_size=CHUNK,
        expires=datetime(2027, 1, 1, tzinfo=UTC),
    )
    root = tmp_path / "store"
    await install(root, old, m1)
    source = MemorySource(new)
    later = datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(SignatureError, match="expired"):
        await update(root, m2, [source], now=lambda: later)
    assert source.requests == [] and (root / "a.bin").read_bytes() == old["a.bin"]
    assert trusted_serial(root) == 1


async def test_update_needs_a_trusted_manifest_and_a_higher_serial(tmp_path: Path) -> None:
    files = {"a.bin": b"x" * 100}
    m1 = await publish(tmp_path / "v1", files, serial=1)
    root = tmp_path / "store"
    with pytest.raises(ManifestError, match="no trusted manifest"):
        await update(root, m1, [])
    await install(root, files, m1)
    with pytest.raises(ManifestError, match="not newer") as info:
        await update(root, m1, [])
    assert info.value.field == "signed.serial"


def test_sigkill_mid_update_then_resume(tmp_path: Path) -> None:
    old = os.urandom(64 * CHUNK)
    new = old[: 16 * CHUNK] + os.urandom(40 * CHUNK) + old[56 * CHUNK :]
    files_old, files_new = {"models/w.bin": old}, {"models/w.bin": new}
    m1 = asyncio.run(publish(tmp_path / "v1", files_old, serial=1))
    m2 = asyncio.run(publish(tmp_path / "v2", files_new, serial=2))
    root = tmp_path / "store"
    asyncio.run(install(root, files_old, m1))
    manifest = tmp_path / "v2.json"
    manifest.write_bytes(dump_manifest(m2))
    args = ["sync", "-m", str(manifest), "-r", str(root), "--json"]
    with http_server(files_new, pause_after=20 * CHUNK) as (url, state):
        with kensho_popen(
            *args,
            "-s",
            url,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            kinds = []
            for line in proc.stdout:
                event = json.loads(line)
                kinds.append(event["kind"])
                if event["kind"] == "storage.download.progress" and event["done"] >= 8 * CHUNK:
                    break
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        assert kinds[:2] == ["storage.update.file", "storage.update.planned"]
        # The old file is untouched and usable; the new one waits in .kensho/tmp.
        assert (root / "models/w.bin").read_bytes() == old
        assert len(list((root / ".kensho" / "tmp").glob("*.part"))) == 1
        assert trusted_serial(root) == 1
        state.resume.set()
        first = len(state.requests)
        again = kensho(*args, "-s", url, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        resumed = [r for r in state.requests[first:] if r[0] == "models/w.bin"]
    assert (root / "models/w.bin").read_bytes() == new
    assert trusted_serial(root) == 2
    assert len(resumed) == 1 and resumed[0][1] is not None
    start, end = map(int, resumed[0][1].removeprefix("bytes=").split("-"))
    assert start >= 24 * CHUNK, "the rerun fetched chunks that were already verified"
    assert start % CHUNK == 0 and end == 56 * CHUNK - 1
    assert list((root / ".kensho" / "tmp").glob("*.part")) == []
    events = [json.loads(line) for line in again.stdout.splitlines()]
    plan = next(e for e in events if e["kind"] == "storage.update.planned")
    assert plan["to_serial"] == 2 and plan["bytes_to_fetch"] == 40 * CHUNK
    assert events[-1]["kind"] == "storage.update.finished"


def test_cli_cdc_build_dry_run_then_update(tmp_path: Path) -> None:
    weights = tensors(6, count=4)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    write_tree(v1, {MODEL: st_bytes(weights)})
    write_tree(v2, {MODEL: st_bytes(weights, metadata={"note": "longer header"})})
    for folder, serial in ((v1, "1"), (v2, "2")):
        built = kensho(
            "manifest", "build", folder, "-o", f"{folder}.json", "--chunking", "cdc",
            "--cdc-avg", "65536", "--serial", serial, cwd=tmp_path,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
    sizes = {
        c["size"]
        for c in json.loads((tmp_path / "v1.json").read_text())["signed"]["files"][0]["chunks"]
    }
    assert len(sizes) > 2 and max(sizes) <= 4 * 65536  # content-defined: sizes vary
    root = tmp_path / "store"
    first = kensho("sync", "-m", "v1.json", "-r", root, "-s", v1, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (root / MODEL).read_bytes()
    dry = kensho("sync", "-m", "v2.json", "-r", root, "-s", v2, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "update plan: serial 1 -> 2" in dry.stdout and "dry run" in dry.stdout
    assert MODEL in dry.stdout and "changed" in dry.stdout
    assert (root / MODEL).read_bytes() == before and trusted_serial(root) == 1
    done = kensho("sync", "-m", "v2.json", "-r", root, "-s", v2, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "update plan: serial 1 -> 2" in done.stderr and "updated" in done.stderr
    assert (root / MODEL).read_bytes() == (v2 / MODEL).read_bytes()
    assert trusted_serial(root) == 2
    again = kensho("sync", "-m", "v2.json", "-r", root, "--dry-run", cwd=tmp_path)
    assert again.returncode == 0 and "nothing changed" in again.stderr


async def test_build_manifest_chunking_rules(tmp_path: Path) -> None:
    data = os.urandom(600_000)
    write_tree(tmp_path, {"a.bin": data, "empty.bin": b""})
    cdc = await build_manifest(tmp_path, name="x", version="1", chunking="cdc", cdc=CDC)
    a = cdc.file("a.bin")
    assert a is not None and len(a.chunks) > 2
    assert all(CDC.min <= c.size <= CDC.max for c in a.chunks[:-1])
    assert b"".join(data[c.offset : c.end] for c in a.chunks) == data
    empty = cdc.file("empty.bin")
    assert empty is not None and empty.chunks == ()
    # A chunk size given alone asks for chunks of that size: fixed.
    fixed = await build_manifest(tmp_path, name="x", version="1", chunk_size=CHUNK)
    a = fixed.file("a.bin")
    assert a is not None and {c.size for c in a.chunks[:-1]} == {CHUNK}
    default = await build_manifest(tmp_path, name="x", version="1")
    explicit = await build_manifest(
        tmp_path, name="x", version="1", chunking=DEFAULT_CHUNKING, cdc=CdcParams()
    )
    assert default.file("a.bin") == explicit.file("a.bin")
    with pytest.raises(ManifestError, match="--cdc-min"):
        CdcParams.from_sizes(65536, min=10)
    with pytest.raises(ManifestError, match="--cdc-min <= --cdc-avg"):
        CdcParams.from_sizes(65536, min=100_000)
    with pytest.raises(ManifestError, match="chunking must be one of"):
        await build_manifest(tmp_path, name="x", version="1", chunking="rolling")  # type: ignore[arg-type]


_EDIT = st.tuples(
    st.sampled_from(["insert", "delete", "replace"]),
    st.integers(0, 20_000),
    st.binary(min_size=1, max_size=3000),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.binary(min_size=0, max_size=20_000),
    edits=st.lists(_EDIT, max_size=4),
    chunking=st.sampled_from(["fixed", "cdc"]),
)
def test_any_edit_updates_to_exactly_the_new_bytes(
    seed: bytes, edits: list[tuple[str, int, bytes]], chunking: Chunking
) -> None:
    """Whatever changed, the update yields the new bytes and fetches what it planned."""
    rng = np.random.default_rng(len(seed))
    old = seed + rng.bytes(20_000)
    new = old
    for kind, where, data in edits:
        at = min(where, len(new))
        if kind == "insert":
            new = new[:at] + data + new[at:]
        elif kind == "delete":
            new = new[:at] + new[at + len(data) :]
        else:
            new = new[:at] + data + new[at + len(data) :]
    small = CdcParams(avg=256, min=64, max=1024)

    async def run(tmp: Path) -> tuple[int, int]:
        write_tree(tmp / "v1", {"f.bin": old, "same.bin": b"kept"})
        write_tree(tmp / "v2", {"f.bin": new, "same.bin": b"kept"})
        kw: dict[str, Any] = {"chunking": chunking, "cdc": small, "chunk_size": 512}
        if chunking == "cdc":
            kw.pop("chunk_size")
        m1 = await build_manifest(tmp / "v1", name="p", version="1", serial=1, **kw)
        m2 = await build_manifest(tmp / "v2", name="p", version="2", serial=2, **kw)
        await install(tmp / "store", {"f.bin": old, "same.bin": b"kept"}, m1)
        source = MemorySource({"f.bin": new, "same.bin": b"kept"})
        manager, _ = await update(tmp / "store", m2, [source])
        assert (tmp / "store" / "f.bin").read_bytes() == new
        assert manager.plan is not None
        return source.bytes_served, manager.plan.bytes_to_fetch

    with tempfile.TemporaryDirectory() as tmp:
        served, planned_bytes = asyncio.run(run(Path(tmp)))
    assert served == planned_bytes
    if new == old:
        assert served == 0


async def test_boot_with_a_newer_manifest_updates_by_plan(tmp_path: Path) -> None:
    """``initialize_and_verify`` given a higher serial plans an update, not a repair."""
    old_weights = tensors(1)
    new_weights = dict(old_weights)
    new_weights["layer3.weight"] = np.ones((512, 256), np.float32)
    old = {MODEL: st_bytes(old_weights), "config.json": b'{"layers": 6}'}
    new = {MODEL: st_bytes(new_weights), "config.json": b'{"layers": 6}'}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    m2 = await publish(tmp_path / "v2", new, serial=2, changelog="layer 3 retrained")
    root = tmp_path / "store"
    await install(root, old, m1)
    with http_server(new) as (url, server):
        async with StorageManager(root, m2, [http(url)]) as manager:
            events = await drain(manager.initialize_and_verify())
        served = server.bytes_served
    assert (root / MODEL).read_bytes() == new[MODEL]
    assert trusted_serial(root) == 2
    assert any(isinstance(e, StorageUpdatePlanned) for e in events)
    assert served <= changed_span(old[MODEL], new[MODEL]) + 2 * CHUNK


async def test_boot_with_a_newer_manifest_offline_stays_on_the_trusted_release(
    tmp_path: Path,
) -> None:
    old = {MODEL: st_bytes(tensors(1)), "config.json": b'{"layers": 6}'}
    new = {MODEL: st_bytes(tensors(2)), "config.json": b'{"layers": 6}'}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    m2 = await publish(tmp_path / "v2", new, serial=2)
    root = tmp_path / "store"
    await install(root, old, m1)
    unreachable = MirrorSource(tmp_path / "usb-stick-not-mounted")
    with capture_logs() as logs:
        async with StorageManager(root, m2, [unreachable]) as manager:
            events = await drain(manager.initialize_and_verify())
    assert isinstance(events[-1], StorageReady)
    assert (root / MODEL).read_bytes() == old[MODEL]  # still the intact old release
    assert trusted_serial(root) == 1
    assert any(e["event"].startswith("update pending") for e in logs)


class _Killed(BaseException):
    """Stands for the process dying (SIGKILL, power loss) between two swaps."""


async def test_update_killed_among_its_swaps_is_finished_at_the_next_offline_boot(
    tmp_path: Path,
) -> None:
    old = {"a.bin": os.urandom(3 * CHUNK), "b.bin": os.urandom(3 * CHUNK)}
    new = {"a.bin": os.urandom(3 * CHUNK), "b.bin": os.urandom(3 * CHUNK)}
    m1 = await publish(tmp_path / "v1", old, serial=1)
    m2 = await publish(tmp_path / "v2", new, serial=2)
    root = tmp_path / "store"
    await install(root, old, m1)
    swaps: list[Path] = []

    class DiesAtSecondSwap(PartWriter):
        def place(self, part: Path, dest: Path) -> StatRecord:
            if swaps:
                raise _Killed
            swaps.append(dest)
            return super().place(part, dest)

    with pytest.raises(_Killed):
        await update(root, m2, [MemorySource(new)], part_writer=DiesAtSecondSwap())
    mixed = {rel: (root / rel).read_bytes() == new[rel] for rel in new}
    assert sorted(mixed.values()) == [False, True]  # one file swapped, one not

    async with StorageManager(root, None, []) as manager:  # offline, no manifest given
        events = await drain(manager.initialize_and_verify())
    assert any(isinstance(e, StorageReady) for e in events)
    assert isinstance(events[-1], StorageUpdateFinished)
    assert all((root / rel).read_bytes() == data for rel, data in new.items())
    assert trusted_serial(root) == 2
    assert not (root / ".kensho" / "pending-manifest.json").exists()


# --- every file placeable before the first swap (all or nothing) ----------------------


def cli_store(tmp_path: Path, old: Mapping[str, bytes], new: Mapping[str, bytes]) -> Path:
    """A store synced to ``old`` (serial 1); ``v2.json`` (serial 2, ``new``) next to it."""
    m1 = asyncio.run(publish(tmp_path / "v1", old, serial=1))
    m2 = asyncio.run(publish(tmp_path / "v2", new, serial=2))
    root = tmp_path / "store"
    asyncio.run(install(root, old, m1))
    (tmp_path / "v2.json").write_bytes(dump_manifest(m2))
    return root


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` but ``.kensho``: file bytes, link targets, folders."""
    tree: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] == ".kensho":
            continue
        if path.is_symlink():
            tree[rel] = f"-> {path.readlink()}"
        elif path.is_dir():
            tree[rel] = "folder"
        else:
            tree[rel] = path.read_bytes()
    return tree


OLD = {
    "models/x.bin": os.urandom(8 * CHUNK),
    "cfg/a.json": b'{"a": 1}',
    "cfg/sub/b.json": b'{"b": 2}',
}
NEW = {
    "models/x.bin": os.urandom(8 * CHUNK),
    "cfg": b"a = 1\nb = 2\n",  # the folder cfg/ of v1 becomes a file
    "extra/c.bin": os.urandom(CHUNK),
    "data/d.bin": os.urandom(CHUNK),
}


def test_cli_update_turns_a_folder_of_dropped_files_into_a_file(tmp_path: Path) -> None:
    root = cli_store(tmp_path, OLD, NEW)
    done = kensho("sync", "-m", "v2.json", "-r", root, "-s", tmp_path / "v2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert snapshot(root) == {"cfg": NEW["cfg"], "data": "folder", "extra": "folder"} | {
        "data/d.bin": NEW["data/d.bin"],
        "extra/c.bin": NEW["extra/c.bin"],
        "models": "folder",
        "models/x.bin": NEW["models/x.bin"],
    }
    assert trusted_serial(root) == 2
    full = kensho("verify", "-r", root, "--full", cwd=tmp_path)
    assert full.returncode == 0, full.stdout


def _unlisted_file_in_the_folder(root: Path) -> None:
    (root / "cfg/notes.txt").write_bytes(b"mine")


def _edited_managed_file(root: Path) -> None:
    (root / "cfg/sub/b.json").write_bytes(b'{"b": 9}')


def _file_where_a_folder_goes(root: Path) -> None:
    (root / "extra").write_bytes(b"mine")


def _folder_where_a_file_goes(root: Path) -> None:
    (root / "cfg/sub").rename(root / "kept")  # cfg/ keeps a.json: a v1 file, deletable
    (root / "cfg/link").symlink_to("../kept")


def _symlinked_folder_inside_the_root(root: Path) -> None:
    (root / "real").mkdir()
    (root / "data").symlink_to("real")


REFUSALS = {
    "unlisted file in the folder": (_unlisted_file_in_the_folder, "'cfg/notes.txt'", True),
    "edited managed file": (_edited_managed_file, "'cfg/sub/b.json'", False),
    "file where a folder goes": (
        _file_where_a_folder_goes,
        "'extra' is a file where a folder is needed",
        True,
    ),
    "link in a folder where a file goes": (
        _folder_where_a_file_goes,
        "'cfg' is a folder where the file goes; it holds 'cfg/link'",
        False,
    ),
    "symlinked folder": (_symlinked_folder_inside_the_root, "data is a symbolic link", True),
}


@pytest.mark.parametrize("case", sorted(REFUSALS), ids=sorted(REFUSALS))
def test_cli_update_that_cannot_be_placed_changes_nothing(tmp_path: Path, case: str) -> None:
    obstruct, named, still_good = REFUSALS[case]
    root = cli_store(tmp_path, OLD, NEW)
    obstruct(root)
    before = snapshot(root)
    with http_server(NEW) as (url, server):
        done = kensho("sync", "-m", "v2.json", "-r", root, "-s", url, cwd=tmp_path)
        requests = list(server.requests)
    assert done.returncode == 4, done.stderr
    assert "refused before changing anything" in done.stderr and named in done.stderr
    assert snapshot(root) == before, "a refused update changed the store"
    assert requests == [], "a refused update fetched data"
    assert trusted_serial(root) == 1
    assert not (root / ".kensho/pending-manifest.json").exists()
    assert list((root / ".kensho/tmp").glob("*.part")) == []
    if still_good:  # the store is still wholly on serial 1
        offline = kensho("sync", "-r", root, cwd=tmp_path)
        assert offline.returncode == 0, offline.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_cli_update_into_a_folder_kensho_may_not_write_in_is_refused(tmp_path: Path) -> None:
    root = cli_store(tmp_path, OLD, NEW)
    (root / "data").mkdir()
    (root / "data").chmod(0o555)
    try:
        done = kensho("sync", "-m", "v2.json", "-r", root, "-s", tmp_path / "v2", cwd=tmp_path)
    finally:
        (root / "data").chmod(0o755)
    assert done.returncode == 4, done.stderr
    assert "permission denied" in done.stderr and "data" in done.stderr
    assert (root / "models/x.bin").read_bytes() == OLD["models/x.bin"]


def test_cli_symlinked_folder_inside_the_root_fails_sync_and_verify_alike(
    tmp_path: Path,
) -> None:
    """``models -> other``: writing models/x.bin would overwrite other/x.bin."""
    files = {"models/x.bin": os.urandom(2 * CHUNK), "other/x.bin": os.urandom(2 * CHUNK)}
    m1 = asyncio.run(publish(tmp_path / "src", files, serial=1))
    (tmp_path / "m.json").write_bytes(dump_manifest(m1))
    root = tmp_path / "store"
    (root / "other").mkdir(parents=True)
    (root / "models").symlink_to("other")
    synced = kensho("sync", "-m", "m.json", "-r", root, "-s", tmp_path / "src", cwd=tmp_path)
    assert synced.returncode == 4, synced.stderr
    assert "models/x.bin" in synced.stderr and "symbolic link" in synced.stderr
    assert (root / "other/x.bin").read_bytes() == files["other/x.bin"]
    full = kensho("verify", "-m", "m.json", "-r", root, "--full", cwd=tmp_path)
    assert full.returncode == 1
    assert "unsafe" in full.stdout


def test_cli_chunks_right_whole_hash_wrong_is_refused_by_sync_and_update_alike(
    tmp_path: Path,
) -> None:
    old, new = os.urandom(4 * CHUNK), os.urandom(4 * CHUNK)
    src = tmp_path / "src"
    write_tree(src, {"w.bin": new})
    for serial in (1, 2):
        signed = signed_for({"w.bin": new}, CHUNK, serial=serial)
        signed["files"][0]["sha256"] = "0" * 64  # every chunk hash stays right
        doc = {"signed": signed, "signatures": []}
        (tmp_path / f"bad{serial}.json").write_text(json.dumps(doc))
    fresh = tmp_path / "fresh"
    synced = kensho("sync", "-m", "bad1.json", "-r", fresh, "-s", src, cwd=tmp_path)
    root = cli_store(tmp_path, {"w.bin": old}, {"w.bin": old})
    updated = kensho("sync", "-m", "bad2.json", "-r", root, "-s", src, cwd=tmp_path)
    for done in (synced, updated):
        assert done.returncode == 4, done.stderr
        assert "whole file's SHA-256 does not match" in done.stderr
    assert not (fresh / "w.bin").exists()
    assert (root / "w.bin").read_bytes() == old and trusted_serial(root) == 1
    for store in (fresh, root):
        assert list((store / ".kensho/tmp").glob("*.part")) == []


def test_a_file_found_under_another_spelling_is_not_taken_for_the_new_one(
    tmp_path: Path,
) -> None:
    """On a case-folding file system ``Model.bin`` answers ``lstat("model.bin")``: the
    planner must see that the name on disk is spelled otherwise (it is the old entry,
    which the placement check deletes) and build the new file instead of keeping it."""
    from kensho.storage._plan import spelled_as_on_disk

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Model.bin").write_bytes(b"x")
    assert spelled_as_on_disk(tmp_path, "models/Model.bin")
    assert not spelled_as_on_disk(tmp_path, "models/model.bin")
    assert not spelled_as_on_disk(tmp_path, "models/Mode\u0301l.bin")  # NFD of an accent
    assert not spelled_as_on_disk(tmp_path, "absent/x.bin")
    (tmp_path / "top.bin").write_bytes(b"y")
    assert spelled_as_on_disk(tmp_path, "top.bin")
