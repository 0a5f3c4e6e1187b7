"""Release channels: a real HTTP origin on 127.0.0.1 (and a mirror folder) publishing
``manifest.json``; conditional polls; every trust rule before anything is staged."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from _peer_support import lying_peer
from _release_support import (
    OTHER_KEY,
    Recorder,
    http,
    install,
    manager,
    published,
    release,
)
from _storage_support import http_server
from kensho.events import ReleaseChecked, ReleaseRefused
from kensho.storage import MirrorSource, dump_manifest
from kensho.storage.channel import ReleaseChannel
from kensho.storage.manifest import MAX_MANIFEST_BYTES
from kensho.storage.sources import source_from_string

V1 = {"model.bin": os.urandom(5 * 4096), "config.json": b'{"layers": 2}'}
V2 = {"model.bin": V1["model.bin"][:8192] + os.urandom(4096) + V1["model.bin"][12288:]}
V2["config.json"] = V1["config.json"]


async def test_new_release_is_found_then_an_unchanged_channel_costs_a_304(
    tmp_path: Path,
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    m2 = release(V2, 2)
    with http_server(published(m2, V2)) as (url, state):
        store = manager(tmp_path, [http(url)])
        seen = Recorder()
        channel = ReleaseChannel(store.sources, store._trust, seen)
        first = await channel.check()
        served = state.bytes_served
        second = await channel.check()
        await store.aclose()
        assert state.requests == [("manifest.json", None)] * 2
        assert state.statuses == [200, 304]
        assert state.bytes_served == served == len(dump_manifest(m2))
    assert first.result == "new" and first.manifest is not None
    assert first.manifest.serial == 2 and first.source == url
    assert second.result == "unchanged"
    checks = seen.of(ReleaseChecked)
    assert [c.result for c in checks] == ["new", "unchanged"]
    assert checks[0].serial == 2 and checks[0].current_serial == 1


async def test_the_release_the_store_runs_is_current(tmp_path: Path) -> None:
    m1 = release(V1, 1)
    await install(tmp_path, V1, m1)
    with http_server(published(m1, V1)) as (url, _):
        store = manager(tmp_path, [http(url)])
        result = await ReleaseChannel(store.sources, store._trust, Recorder()).check()
        await store.aclose()
    assert result.result == "current"


def _refused_cases() -> dict[str, tuple[Any, str]]:
    old = "2026-11-26T10:00:00Z"  # after `created`, before today
    assert datetime.now(UTC) > datetime.fromisoformat(old)
    return {
        "unsigned": (dump_manifest(release(V2, 2, key=None)), "signature"),
        "other key": (dump_manifest(release(V2, 2, key=OTHER_KEY)), "signature"),
        "rollback": (dump_manifest(release(V1, 0)), "rollback"),
        "same serial, other content": (dump_manifest(release(V2, 1)), "reuses the trusted serial"),
        "expired": (dump_manifest(release(V2, 2, expires=old)), "expired"),
        "another store": (dump_manifest(release(V2, 2, name="other")), "for the store 'other'"),
        "garbage": (b"<html>captive portal</html>", "not a valid manifest"),
        "too large": (b" " * (MAX_MANIFEST_BYTES + 1), "larger than"),
    }


@pytest.mark.parametrize("case", list(_refused_cases()))
async def test_a_refused_release_is_reported_once_and_never_staged(
    tmp_path: Path, case: str
) -> None:
    body, reason = _refused_cases()[case]
    await install(tmp_path, V1, release(V1, 1))
    before = {p: (tmp_path / p).read_bytes() for p in V1}
    with http_server({**V2, "manifest.json": body}) as (url, _):
        store = manager(tmp_path, [http(url)])
        seen = Recorder()
        channel = ReleaseChannel(store.sources, store._trust, seen)
        results = [await channel.check() for _ in range(3)]
        await store.aclose()
    if case == "too large":  # refused on the wire: a download error, nothing parsed
        assert [r.result for r in results] == ["none"] * 3
        assert reason in results[0].detail
        return
    assert [r.result for r in results] == ["refused"] * 3
    refusals = seen.of(ReleaseRefused)
    assert len(refusals) == 1, "a refused release is reported once, not at every poll"
    assert reason in refusals[0].reason
    assert {p: (tmp_path / p).read_bytes() for p in V1} == before
    assert not (tmp_path / ".kensho" / "staging").exists()


async def test_a_mirror_folder_is_a_channel_unchanged_while_its_file_is(tmp_path: Path) -> None:
    root, mirror = tmp_path / "store", tmp_path / "usb"
    await install(root, V1, release(V1, 1))
    mirror.mkdir()
    (mirror / "manifest.json").write_bytes(dump_manifest(release(V2, 2)))
    store = manager(root, [MirrorSource(mirror)])
    channel = ReleaseChannel(store.sources, store._trust, Recorder())
    first, second = await channel.check(), await channel.check()
    (mirror / "manifest.json").unlink()
    gone = await channel.check()
    await store.aclose()
    assert (first.result, second.result) == ("new", "unchanged")
    assert gone.result == "none" and "publishes no release" in gone.detail


async def test_an_unreachable_origin_is_reported_as_such(tmp_path: Path) -> None:
    await install(tmp_path, V1, release(V1, 1))
    with http_server({}) as (url, _):
        pass  # stopped: nothing listens there any more
    store = manager(tmp_path, [http(url)])
    result = await ReleaseChannel(store.sources, store._trust, Recorder()).check()
    await store.aclose()
    assert result.result == "unreachable" and "cannot connect" in result.detail


async def test_a_peer_is_not_polled_and_the_origin_behind_it_publishes(tmp_path: Path) -> None:
    await install(tmp_path, V1, release(V1, 1))
    m2 = release(V2, 2)
    with lying_peer({}, "missing") as (peer_url, peer), http_server(published(m2, V2)) as (url, _):
        peer_source = source_from_string(peer_url)
        store = manager(tmp_path, [peer_source, http(url)])
        seen = Recorder()
        channel = ReleaseChannel(store.sources, store._trust, seen)
        results = [await channel.check() for _ in range(2)]
        alone = await ReleaseChannel([peer_source], store._trust, seen).check()
        await store.aclose()
        assert peer.requests == [], "a peer publishes no release: never asked for one"
    assert channel.skipped == [peer_source.name]
    assert [r.result for r in results] == ["new", "unchanged"]
    assert results[0].source == url
    assert alone.result == "none" and f"not polled: {peer_source.name}" in alone.detail
    assert not seen.of(ReleaseRefused)
