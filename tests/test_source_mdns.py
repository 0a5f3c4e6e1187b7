"""``peer+mdns://``: peers heard on the LAN, then asked like ``peer+http://`` ones.

Announcements are real DNS-SD registrations on the loopback interface (another
device's, made with python-zeroconf: :mod:`_mdns_support`), browses are real
multicast queries, peers are the real share app and real lying servers, the origin
the counting HTTP server of the storage tests. Each test announces a service type
of its own, so tests running side by side never hear each other. The browse window
is timed on a virtual clock where the test is about the window itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from _mdns_support import announced, service_type
from _peer_support import lying_peer, share_server, sync_store, synced_store
from _storage_support import http_server, manifest_for, sha
from kensho.config import StorageSettings
from kensho.errors import SourceError, SourceUnreachableError
from kensho.runtime.clock import VirtualClock
from kensho.storage.sources import PEER_API_KEY_ENV, HttpSource, source_from_string
from kensho.storage.sources.mdns import (
    DEFAULT_DISCOVERY_TIMEOUT,
    MdnsPeers,
    PeerAd,
    ZeroconfBrowser,
    peer_ad,
    txt_record,
)
from kensho.telemetry.testing import capture_logs

CHUNK = 16_384
FILES = {"models/w.bin": os.urandom(100_000), "tok.json": os.urandom(40_000)}
MANIFEST = manifest_for(FILES, CHUNK)
V1 = {b"v": b"1", b"auth": b"none", b"id": b"abc"}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def lan_peers(kind: str, timeout: float = DEFAULT_DISCOVERY_TIMEOUT) -> MdnsPeers:
    return MdnsPeers(ZeroconfBrowser(service_type=kind), timeout=timeout)


# --- the record → peer mapping ------------------------------------------------------


def test_an_announcement_maps_to_a_peer_url_on_its_ipv4_address() -> None:
    ad = peer_ad("kensho-abc._kensho-chunks._tcp.local.", ["fd00::5", "10.0.0.5"], 8700, V1)
    assert ad == PeerAd(
        name="kensho-abc._kensho-chunks._tcp.local.",
        url="peer+http://10.0.0.5:8700",
        auth=False,
        instance_id="abc",
    )


def test_an_ipv6_address_is_bracketed_and_a_link_local_one_never_chosen() -> None:
    ad = peer_ad("x", ["fe80::1", "fd00::5"], 8700, V1)
    assert ad is not None
    assert ad.url == "peer+http://[fd00::5]:8700"


@pytest.mark.parametrize(
    ("addresses", "port", "properties"),
    [
        (["10.0.0.5"], 8700, {**V1, b"v": b"2"}),  # a protocol it does not speak
        (["10.0.0.5"], 8700, {b"auth": b"none"}),  # no protocol at all
        ([], 8700, V1),  # no address
        (["fe80::1"], 8700, V1),  # only a link-local one
        (["10.0.0.5"], 0, V1),
        (["10.0.0.5"], None, V1),
    ],
)
def test_an_announcement_a_store_cannot_use_is_skipped(
    addresses: list[str], port: int | None, properties: dict[bytes, bytes | None]
) -> None:
    assert peer_ad("x", addresses, port, properties) is None


def test_anything_but_auth_none_asks_for_a_key_and_the_txt_never_holds_one() -> None:
    for auth, wants in [(b"none", False), (b"bearer", True), (b"something-new", True)]:
        ad = peer_ad("x", ["10.0.0.5"], 1, {**V1, b"auth": auth})
        assert ad is not None
        assert ad.auth is wants
    assert txt_record(auth=True, instance_id="abc") == {"v": "1", "auth": "bearer", "id": "abc"}


# --- the source spec ----------------------------------------------------------------


def test_peer_mdns_builds_the_discovering_source_with_the_settings_window() -> None:
    source = source_from_string("peer+mdns://", settings=StorageSettings(discovery_timeout=0.7))
    assert isinstance(source, MdnsPeers)
    assert source.timeout == 0.7
    assert source.name == "peer+mdns://"
    assert isinstance(source_from_string("PEER+MDNS:///"), MdnsPeers)


@pytest.mark.parametrize(
    "spec", ["peer+mdns://10.0.0.5:8700", "peer+mdns://x/y", "peer+mdns://?a=1"]
)
def test_peer_mdns_takes_nothing_after_the_slashes(spec: str) -> None:
    with pytest.raises(SourceError, match=r"write peer\+mdns:// alone"):
        source_from_string(spec)


def test_without_zeroconf_peer_mdns_is_an_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "zeroconf", None)  # what an install without it gives
    with pytest.raises(SourceError, match=r"zeroconf package.*pip install 'kensho\[mdns\]'"):
        source_from_string("peer+mdns://")


# --- browsing -----------------------------------------------------------------------


async def test_the_browse_listens_for_its_whole_window_and_no_longer() -> None:
    clock = VirtualClock()
    browser = ZeroconfBrowser(service_type=service_type(), sleep=clock.sleep)
    browse = asyncio.create_task(browser.browse(1.5))
    await clock.advance(1.49)
    assert not browse.done()
    await clock.advance(0.01)
    assert await asyncio.wait_for(browse, 10) == []  # the sockets close in real time


async def test_a_peer_announced_on_the_lan_is_heard_with_its_address_port_and_txt() -> None:
    kind = service_type()
    with announced(8701, kind, auth=True) as info:
        ads = await ZeroconfBrowser(service_type=kind).browse(DEFAULT_DISCOVERY_TIMEOUT)
    assert [(ad.name, ad.url, ad.auth) for ad in ads] == [
        (info.name, "peer+http://127.0.0.1:8701", True)
    ]


def test_a_store_syncs_from_a_peer_it_heard_on_the_lan_without_asking_the_origin(
    tmp_path: Path,
) -> None:
    kind = service_type()
    synced_store(tmp_path / "seed", MANIFEST, FILES)
    with (
        share_server(tmp_path / "seed") as (url, service),
        announced(port_of(url), kind),
        http_server(FILES) as (origin, st),
    ):
        peers = lan_peers(kind)
        sync_store(tmp_path / "new", MANIFEST, [peers, HttpSource(origin)])
        assert peers.peers == [url]
        assert st.bytes_served == 0
        assert service.served_bytes == sum(map(len, FILES.values()))
    for rel, data in FILES.items():
        assert (tmp_path / "new" / rel).read_bytes() == data


def test_a_lying_peer_heard_on_the_lan_is_distrusted_and_an_honest_one_serves(
    tmp_path: Path,
) -> None:
    kind = service_type()
    chunks = {
        sha(d[o : o + CHUNK]): d[o : o + CHUNK]
        for d in FILES.values()
        for o in range(0, len(d), CHUNK)
    }
    synced_store(tmp_path / "seed", MANIFEST, FILES)
    with (
        lying_peer(chunks, "wrong") as (liar_url, liar),
        share_server(tmp_path / "seed") as (url, service),
        announced(port_of(liar_url), kind),
        announced(port_of(url), kind),
        http_server(FILES) as (origin, st),
    ):
        peers = lan_peers(kind)
        sync_store(tmp_path / "new", MANIFEST, [peers, HttpSource(origin)])
        assert sorted(peers.peers) == sorted([liar_url, url])
        assert len(liar.requests) == 1  # one lie, then never asked again
        assert service.served_bytes > 0
        assert st.bytes_served < sum(map(len, FILES.values()))
    for rel, data in FILES.items():
        assert (tmp_path / "new" / rel).read_bytes() == data


def test_with_no_peer_on_the_lan_one_log_line_and_the_next_source_serves(tmp_path: Path) -> None:
    with http_server(FILES) as (origin, st), capture_logs() as logs:
        peers = lan_peers(service_type(), timeout=0.3)
        sync_store(tmp_path / "new", MANIFEST, [peers, HttpSource(origin)])
        assert st.bytes_served == sum(map(len, FILES.values()))
    said = [e for e in logs if "no Kensho peer answered on the LAN" in e["event"]]
    assert len(said) == 1
    assert said[0]["level"] == "warning"
    assert "0.3 s" in said[0]["event"]
    for rel, data in FILES.items():
        assert (tmp_path / "new" / rel).read_bytes() == data


async def test_with_no_peer_heard_a_fetch_is_unreachable_not_a_fault() -> None:
    peers = lan_peers(service_type(), timeout=0.2)
    peers.know(MANIFEST)

    async def sink(data: bytes) -> None:
        raise AssertionError("no byte expected")

    with pytest.raises(SourceUnreachableError, match="no Kensho peer announced itself"):
        await peers.fetch("tok.json", 0, CHUNK, len(FILES["tok.json"]), sink)
    await peers.aclose()


def test_a_peer_that_wants_a_key_is_asked_only_with_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind = service_type()
    key = "lan-peer-key-123"
    synced_store(tmp_path / "seed", MANIFEST, FILES)
    with (
        share_server(tmp_path / "seed", api_key=key) as (url, service),
        announced(port_of(url), kind, auth=True),
        http_server(FILES) as (origin, st),
    ):
        monkeypatch.delenv(PEER_API_KEY_ENV, raising=False)
        with capture_logs() as logs:
            keyless = lan_peers(kind)
            sync_store(tmp_path / "keyless", MANIFEST, [keyless, HttpSource(origin)])
        assert keyless.peers == []
        assert service.served_bytes == 0  # skipped, not refused: no 401 was asked for
        assert any(PEER_API_KEY_ENV in e["event"] for e in logs)
        monkeypatch.setenv(PEER_API_KEY_ENV, key)
        served = st.bytes_served
        keyed = lan_peers(kind)
        sync_store(tmp_path / "keyed", MANIFEST, [keyed, HttpSource(origin)])
        assert keyed.peers == [url]
        assert st.bytes_served == served  # the origin sent nothing more
    assert (tmp_path / "keyed" / "tok.json").read_bytes() == FILES["tok.json"]


def test_a_range_one_peer_holds_only_the_start_of_is_finished_by_the_next(
    tmp_path: Path,
) -> None:
    """Peer A took an older release sharing the file's first three chunks; B has it all."""
    data = FILES["models/w.bin"]
    old = {"models/w.bin": data[: 3 * CHUNK] + os.urandom(5000)}
    synced_store(tmp_path / "a", manifest_for(old, CHUNK), old)
    synced_store(tmp_path / "b", MANIFEST, FILES)
    kind = service_type()

    async def fetch_twice(peers: MdnsPeers) -> None:
        peers.know(MANIFEST)
        try:
            assert sorted(await peers.discover()) == sorted([a_url, b_url])
            for _ in range(2):  # the first peer asked rotates: both orders
                got = bytearray()

                async def sink(piece: bytes, into: bytearray = got) -> None:
                    into.extend(piece)

                await peers.fetch("models/w.bin", 0, len(data), len(data), sink)
                assert bytes(got) == data
        finally:
            await peers.aclose()

    with (
        share_server(tmp_path / "a") as (a_url, a),
        share_server(tmp_path / "b") as (b_url, b),
        announced(port_of(a_url), kind),
        announced(port_of(b_url), kind),
    ):
        asyncio.run(fetch_twice(lan_peers(kind)))
    # A first: chunks 0-2 from A, its 404 on chunk 3, the rest from B; B first: all of it.
    assert a.served_bytes == 3 * CHUNK
    assert b.served_bytes == 2 * len(data) - 3 * CHUNK


async def test_a_new_release_browses_again_and_keeps_the_peers_heard_before() -> None:
    kind = service_type()
    with announced(8702, kind):
        peers = lan_peers(kind)
        peers.know(MANIFEST)
        assert await peers.discover() == ["peer+http://127.0.0.1:8702"]
        with announced(8703, kind):
            assert await peers.discover() == ["peer+http://127.0.0.1:8702"]  # same release
            peers.know(MANIFEST)  # the next run's release: listen again
            assert sorted(await peers.discover()) == [
                "peer+http://127.0.0.1:8702",
                "peer+http://127.0.0.1:8703",
            ]
    await peers.aclose()
