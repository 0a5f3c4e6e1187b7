"""Peers: stores that fetch verified chunks by hash from each other, all real.

The serving side is the real share app on 127.0.0.1 over a store synced the way
``kensho sync`` does it; the origin is the threaded HTTP server of the storage
tests (it counts every body byte). Lying peers are real servers too. Slow-loris is
timed on a virtual clock (httpx's mock transport), like the HTTP source's health tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from _peer_support import lying_peer, share_server, sync_store, synced_store
from _storage_support import http_server, manifest_for, sha
from kensho.config import ShareSettings
from kensho.errors import DownloadError, SourceError
from kensho.runtime.clock import VirtualClock
from kensho.server import UploadPacer
from kensho.storage.sources import HttpSource, PeerSource, source_from_string
from kensho.storage.sources._base import Sink
from kensho.storage.state import StateStore, StatRecord

CHUNK = 16_384
FILES = {"models/w.bin": os.urandom(100_000), "tok.json": os.urandom(40_000)}
MANIFEST = manifest_for(FILES, CHUNK)


def chunk_bytes(files: dict[str, bytes], size: int = CHUNK) -> dict[str, bytes]:
    """sha256 -> bytes of every chunk of ``files``."""
    return {
        sha(data[off : off + size]): data[off : off + size]
        for data in files.values()
        for off in range(0, len(data), size)
    }


def assert_store_holds(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel


def peer(url: str, **kw: object) -> PeerSource:
    source = source_from_string(url)
    assert isinstance(source, PeerSource)
    for key, value in kw.items():
        setattr(source, key, value)
    return source


def test_a_store_syncs_from_a_peer_without_asking_the_origin(tmp_path: Path) -> None:
    synced_store(tmp_path / "seed", MANIFEST, FILES)
    with share_server(tmp_path / "seed") as (url, service), http_server(FILES) as (origin, st):
        sync_store(tmp_path / "new", MANIFEST, [peer(url), HttpSource(origin)])
        assert st.bytes_served == 0
        assert st.requests == []
        assert service.served_bytes == sum(map(len, FILES.values()))
    assert_store_holds(tmp_path / "new", FILES)


def test_a_chunk_the_peer_lacks_is_a_quick_404_and_the_origin_fills_in(tmp_path: Path) -> None:
    """The peer has the old release (one file); the new one adds a file only the origin has."""
    old = {"models/w.bin": FILES["models/w.bin"]}
    synced_store(tmp_path / "seed", manifest_for(old, CHUNK), old)
    with share_server(tmp_path / "seed") as (url, _), http_server(FILES) as (origin, st):
        source = peer(url)
        sync_store(tmp_path / "new", MANIFEST, [source, HttpSource(origin)])
        assert st.bytes_served == len(FILES["tok.json"])  # only what the peer lacks
        assert [path for path, _ in st.requests] == ["tok.json"]
        assert source.abandoned is None  # a missing chunk costs nothing more
    assert_store_holds(tmp_path / "new", FILES)


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("wrong", "sent wrong bytes for chunk"),
        ("short-length", "declared 16383 bytes for chunk"),
        ("long", "declared 16395 bytes"),
        ("endless", "sent more than the 16384 bytes"),
        ("vanish", "broke off chunk"),
    ],
)
def test_a_lying_peer_is_distrusted_for_the_run_and_the_origin_fills_in(
    tmp_path: Path, mode: str, why: str
) -> None:
    with lying_peer(chunk_bytes(FILES), mode) as (url, liar), http_server(FILES) as (origin, st):
        source = peer(url)
        sync_store(tmp_path / "new", MANIFEST, [source, HttpSource(origin)])
        assert len(liar.requests) == 1  # one lie; the second file never asks it
        assert st.bytes_served == sum(map(len, FILES.values()))
    assert source.abandoned is not None
    assert why in source.abandoned
    assert_store_holds(tmp_path / "new", FILES)
    parts = list((tmp_path / "new" / ".kensho" / "tmp").glob("*.part"))
    assert parts == []


async def test_a_wrong_chunk_never_completes_in_the_sink() -> None:
    """The peer checks each chunk before its last piece goes on: a wrong one stays partial."""
    data = FILES["models/w.bin"]
    with lying_peer(chunk_bytes(FILES), "wrong") as (url, _):
        source = peer(url)
        source.know(MANIFEST)
        got = bytearray()

        async def sink(piece: bytes) -> None:
            got.extend(piece)

        with pytest.raises(DownloadError, match="sent wrong bytes"):
            await source.fetch("models/w.bin", 0, CHUNK, len(data), sink)
        await source.aclose()
    assert len(got) < CHUNK


class _Trickle(httpx.AsyncByteStream):
    """One byte per virtual second, forever (slow-loris)."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            await self.clock.advance(1.0)
            yield b"x"


async def test_a_slow_loris_peer_is_abandoned_after_one_rate_window() -> None:
    clock = VirtualClock()
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, headers={"Content-Length": str(CHUNK)}, stream=_Trickle(clock))

    source = PeerSource(
        "peer+http://peer.test:8700",
        transport=httpx.MockTransport(handler),
        clock=clock,
        min_rate=1024,
        rate_window=10,
    )
    source.know(MANIFEST)
    sink: Sink = _discard
    with pytest.raises(DownloadError, match="slow-loris"):
        await source.fetch("models/w.bin", 0, CHUNK, len(FILES["models/w.bin"]), sink)
    assert 10 <= clock.monotonic() <= 11
    with pytest.raises(DownloadError, match="skipped, not asked again"):
        await source.fetch("tok.json", 0, CHUNK, len(FILES["tok.json"]), sink)
    assert len(requests) == 1
    await source.aclose()


async def _discard(_: bytes) -> None:
    return None


def test_ranges_that_are_not_whole_chunks_of_the_known_release_are_refused() -> None:
    source = peer("peer+http://127.0.0.1:1")
    with pytest.raises(SourceError, match="not in the manifest this run builds"):
        source.chunks_for("models/w.bin", 0, CHUNK, len(FILES["models/w.bin"]))
    source.know(MANIFEST)
    size = len(FILES["models/w.bin"])
    assert [c.offset for c in source.chunks_for("models/w.bin", CHUNK, 2 * CHUNK, size)] == [
        CHUNK,
        2 * CHUNK,
    ]
    with pytest.raises(SourceError, match="whole chunks only"):
        source.chunks_for("models/w.bin", 1, CHUNK, size)
    with pytest.raises(SourceError, match="not in the manifest"):
        source.chunks_for("models/w.bin", 0, CHUNK, size + 1)  # another size: another file


def test_a_peer_url_with_credentials_or_another_scheme_is_refused() -> None:
    with pytest.raises(SourceError, match="KENSHO_PEER_API_KEY"):
        PeerSource("peer+http://user:secret@10.0.0.5:8700")
    with pytest.raises(SourceError, match="not a peer URL"):
        PeerSource("http://10.0.0.5:8700")


# -- the serving side ----------------------------------------------------------------


def test_the_chunk_route_serves_ranges_and_refuses_bad_hashes(tmp_path: Path) -> None:
    synced_store(tmp_path / "seed", MANIFEST, FILES)
    data = FILES["models/w.bin"]
    first = MANIFEST.files[0].chunks[0]
    with share_server(tmp_path / "seed") as (url, _):
        base = url.removeprefix("peer+")
        r = httpx.get(f"{base}/v1/kensho/chunks/{first.sha256}", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206
        assert r.content == data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{CHUNK}"
        r = httpx.get(f"{base}/v1/kensho/chunks/{first.sha256}", headers={"Range": "bytes=-5"})
        assert r.content == data[CHUNK - 5 : CHUNK]
        r = httpx.get(f"{base}/v1/kensho/chunks/{first.sha256}", headers={"Range": "bytes=99999-"})
        assert r.status_code == 416
        assert r.headers["Content-Range"] == f"bytes */{CHUNK}"
        r = httpx.get(f"{base}/v1/kensho/chunks/{first.sha256.upper()}")
        assert r.status_code == 400
        assert "is not a SHA-256" in r.json()["error"]["message"]


def test_only_chunks_of_files_whose_last_check_passed_are_served(tmp_path: Path) -> None:
    root = tmp_path / "seed"
    synced_store(root, MANIFEST, FILES)
    w = MANIFEST.file("models/w.bin")
    assert w is not None
    with share_server(root) as (url, _):
        base = url.removeprefix("peer+")
        (root / "models/w.bin").write_bytes(b"garbage".ljust(len(FILES["models/w.bin"]), b"!"))
        r = httpx.get(f"{base}/v1/kensho/chunks/{w.chunks[0].sha256}")
        assert r.status_code == 404  # changed since its check
        assert r.json()["error"]["code"] == "chunk_not_found"
        tok = MANIFEST.file("tok.json")
        assert tok is not None
        assert httpx.get(f"{base}/v1/kensho/chunks/{tok.chunks[0].sha256}").status_code == 200


def test_a_file_that_rotted_without_a_stat_change_is_cut_off_and_unshelved(
    tmp_path: Path,
) -> None:
    """A record that vouches for changed bytes: the read-time hash still stops the chunk."""
    root = tmp_path / "seed"
    synced_store(root, MANIFEST, FILES)
    w = MANIFEST.file("models/w.bin")
    assert w is not None
    rotten = bytearray(FILES["models/w.bin"])
    rotten[100] ^= 0xFF
    (root / "models/w.bin").write_bytes(rotten)
    state = StateStore(root)
    state.put([(w.path, w.sha256, StatRecord.of((root / w.path).lstat()))])  # fooled
    state.close()
    with share_server(root) as (url, _):
        base = url.removeprefix("peer+")
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{base}/v1/kensho/chunks/{w.chunks[0].sha256}")
        r = httpx.get(f"{base}/v1/kensho/chunks/{w.chunks[1].sha256}")
        assert r.status_code == 404  # the whole file left the shelf


def test_the_api_key_is_required_and_a_keyless_peer_is_told_how(tmp_path: Path) -> None:
    synced_store(tmp_path / "seed", MANIFEST, FILES)
    key = "s3cret-peer-key"
    with share_server(tmp_path / "seed", api_key=key) as (url, _), http_server(FILES) as (o, st):
        keyless = peer(url)
        sync_store(tmp_path / "a", MANIFEST, [keyless, HttpSource(o)])
        assert keyless.abandoned is not None
        assert "HTTP 401" in keyless.abandoned
        assert "KENSHO_PEER_API_KEY" in keyless.abandoned
        served = st.bytes_served
        sync_store(tmp_path / "b", MANIFEST, [PeerSource(url, api_key=key), HttpSource(o)])
        assert st.bytes_served == served  # all from the peer
    assert_store_holds(tmp_path / "b", FILES)


def test_transfers_past_max_transfers_get_429_and_a_slot_frees_when_one_ends(
    tmp_path: Path,
) -> None:
    big = {"big.bin": os.urandom(32 << 20)}
    manifest = manifest_for(big, 32 << 20)
    synced_store(tmp_path / "seed", manifest, big)
    chunk = manifest.files[0].chunks[0].sha256
    settings = ShareSettings(max_transfers=1)
    with share_server(tmp_path / "seed", settings=settings) as (url, service):
        base = url.removeprefix("peer+") + f"/v1/kensho/chunks/{chunk}"
        with httpx.Client() as first, first.stream("GET", base) as held:
            assert held.status_code == 200
            body = held.iter_raw(65536)  # kept: a dropped iterator closes the response
            next(body)  # the body is being sent, and blocks on us
            assert service.sending == 1
            busy = httpx.get(base)
            assert busy.status_code == 429
            assert busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "share_busy"
        r = httpx.get(base, timeout=30)
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == chunk


async def test_the_upload_pacer_holds_the_rate_across_transfers() -> None:
    clock = VirtualClock()
    pacer = UploadPacer(1000, clock)
    await pacer.take(1000)  # the first second's worth goes at once
    assert clock.monotonic() == 0
    waiter = asyncio.ensure_future(pacer.take(500))
    await clock.settle()
    assert not waiter.done()
    await clock.advance(0.5)
    assert waiter.done()
    unlimited = UploadPacer(0, clock)
    await unlimited.take(10**9)
    assert clock.monotonic() == 0.5


def test_a_keyless_share_refuses_other_web_origins_and_rebound_names(tmp_path: Path) -> None:
    synced_store(tmp_path / "seed", MANIFEST, FILES)
    sha256 = MANIFEST.files[0].chunks[0].sha256
    with share_server(tmp_path / "seed") as (url, _):
        route = url.removeprefix("peer+") + f"/v1/kensho/chunks/{sha256}"
        r = httpx.get(route, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "origin_refused"
        assert httpx.get(route, headers={"Host": "evil.example"}).status_code == 403
        assert httpx.get(route).status_code == 200
