"""``s3://`` sources against a real S3 implementation on 127.0.0.1 (moto's server mode).

The credentials and the endpoint come from the environment, as for ``aws s3 cp``
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...). Faults S3 has and moto does not
play (``503 SlowDown``, ``403 AccessDenied``) come from a small forwarding proxy
in front of it that answers them in S3's own XML for the requests it is told to.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from _peer_support import sync_store
from _release_support import Recorder, install, manager, published, release
from _storage_support import manifest_for
from kensho.errors import SourceError, SourceUnreachableError
from kensho.events import ReleaseRefused
from kensho.storage.channel import ReleaseChannel
from kensho.storage.prefetch import Prefetcher
from kensho.storage.sources import MemorySource, ObjectStoreSource, source_from_string

CHUNK = 32_768
FILES = {"models/w.bin": os.urandom(300_000), "tok.json": os.urandom(50_000)}
MANIFEST = manifest_for(FILES, CHUNK)
BUCKET = "kensho-models"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    for rel, data in FILES.items():
        client.put_object(Bucket=BUCKET, Key=f"release/{rel}", Body=data)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str) -> str:
    """The standard AWS environment, pointed at moto; no config file of this machine."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_url


@dataclass
class ProxyState:
    upstream: str
    slowdown: int = 0  # answer this many GETs 503 SlowDown first
    deny: bool = False  # answer every request 403 AccessDenied
    ranges: list[str] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    statuses: list[int] = field(default_factory=list)
    body_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error>"
)


class _Proxy(BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        self._forward()

    def _forward(self) -> None:
        st = self.server.state
        with st.lock:
            fault = None
            if st.deny:
                fault = (403, "AccessDenied", "Access Denied")
            elif self.command == "GET" and st.slowdown > 0:
                st.slowdown -= 1
                fault = (503, "SlowDown", "Please reduce your request rate.")
            st.calls.append((self.command, self.path.split("?")[0]))
            if self.command == "GET" and "Range" in self.headers:
                st.ranges.append(self.headers["Range"])
        if fault is not None:
            status, code, message = fault
            body = _ERROR.format(code=code, message=message).encode()
            self._answer(status, {"Content-Type": "application/xml"}, body)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        r = httpx.request(self.command, st.upstream + self.path, headers=headers)
        keep = {"content-type", "content-range", "etag", "last-modified", "accept-ranges"}
        self._answer(
            r.status_code,
            {k: v for k, v in r.headers.items() if k.lower() in keep or k.startswith("x-amz")},
            r.content,
            length=int(r.headers.get("content-length", len(r.content))),
        )

    def _answer(
        self, status: int, headers: dict[str, str], body: bytes, length: int | None = None
    ) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        with self.server.state.lock:
            self.server.state.statuses.append(status)
            if self.command == "GET" and status < 300:
                self.server.state.body_bytes += len(body)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    state: ProxyState


@contextmanager
def s3_proxy(monkeypatch: pytest.MonkeyPatch, upstream: str, **faults: Any) -> Iterator[ProxyState]:
    """A proxy in front of moto, made the endpoint (``AWS_ENDPOINT_URL``)."""
    server = _ProxyServer(("127.0.0.1", 0), _Proxy)
    server.state = ProxyState(upstream, **faults)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def s3(url: str = f"s3://{BUCKET}/release", **kw: Any) -> ObjectStoreSource:
    return ObjectStoreSource(url, **kw)


def assert_store_holds(root: Path) -> None:
    for rel, data in FILES.items():
        assert (root / rel).read_bytes() == data, rel


def test_a_store_syncs_from_s3_in_ranged_parts_with_the_standard_environment(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with s3_proxy(monkeypatch, aws_env) as proxy:
        source = source_from_string(f"s3://{BUCKET}/release/")
        assert isinstance(source, ObjectStoreSource)
        source.part_size = 100_000
        sync_store(tmp_path / "store", MANIFEST, [source])
        assert proxy.body_bytes == sum(map(len, FILES.values()))
        assert "bytes=0-99999" in proxy.ranges
        assert "bytes=200000-299999" in proxy.ranges
    assert_store_holds(tmp_path / "store")


def test_a_repair_fetches_only_the_range_of_the_bad_chunk(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    sync_store(root, MANIFEST, [s3()])
    damaged = bytearray(FILES["models/w.bin"])
    damaged[5 * CHUNK + 7] ^= 0xFF
    (root / "models/w.bin").write_bytes(damaged)
    with s3_proxy(monkeypatch, aws_env) as proxy:
        sync_store(root, MANIFEST, [s3()])
        assert proxy.ranges == [f"bytes={5 * CHUNK}-{6 * CHUNK - 1}"]
        assert proxy.body_bytes == CHUNK
    assert_store_holds(root)


def test_a_missing_key_fails_that_file_only_and_the_next_source_fills_it(
    tmp_path: Path, aws_env: str
) -> None:
    manifest = manifest_for({**FILES, "extra.bin": b"only in the mirror"}, CHUNK)
    source = s3()
    backup = MemorySource({"extra.bin": b"only in the mirror"})
    sync_store(tmp_path / "store", manifest, [source, backup])
    assert backup.requests == [("extra.bin", 0, 18)]
    assert source.abandoned is None
    assert (tmp_path / "store/extra.bin").read_bytes() == b"only in the mirror"
    assert_store_holds(tmp_path / "store")


@pytest.mark.usefixtures("aws_env")
async def test_a_missing_key_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match=r"s3://kensho-models/release/nope\.bin is not in"):
        await _fetch_all(s3(), "nope.bin", 10)


async def _fetch_all(source: ObjectStoreSource, path: str, size: int) -> bytes:
    got = bytearray()

    async def sink(piece: bytes) -> None:
        got.extend(piece)

    await source.fetch(path, 0, size, size, sink)
    return bytes(got)


@pytest.mark.usefixtures("aws_env")
async def test_no_such_bucket_abandons_the_source_with_a_clear_message() -> None:
    source = s3("s3://no-such-bucket/release")
    with pytest.raises(SourceError, match="the bucket 'no-such-bucket' does not exist"):
        await _fetch_all(source, "tok.json", len(FILES["tok.json"]))
    assert source.abandoned is not None
    with pytest.raises(SourceError, match="skipped, not asked again"):
        await _fetch_all(source, "models/w.bin", len(FILES["models/w.bin"]))


@pytest.mark.usefixtures("aws_env")
async def test_another_size_than_declared_is_refused_before_any_byte() -> None:
    with pytest.raises(SourceError, match="offers 50000 bytes but the manifest declares 49999"):
        await _fetch_all(s3(), "tok.json", 49_999)


def test_access_denied_abandons_the_source_and_names_the_credentials(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with s3_proxy(monkeypatch, aws_env, deny=True) as proxy:
        source = s3(attempts=1)
        sync_store(tmp_path / "store", MANIFEST, [source, MemorySource(FILES)])
        assert set(proxy.statuses) == {403}
        assert len(proxy.statuses) == 1  # the second file never asked
    assert source.abandoned is not None
    assert "access denied" in source.abandoned
    assert "AWS_PROFILE" in source.abandoned
    assert_store_holds(tmp_path / "store")


def test_a_few_slowdowns_are_retried_and_the_sync_finishes_from_s3(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with s3_proxy(monkeypatch, aws_env, slowdown=2) as proxy:
        sync_store(tmp_path / "store", MANIFEST, [s3(attempts=4)])
        assert proxy.statuses.count(503) == 2
        assert proxy.body_bytes == sum(map(len, FILES.values()))
    assert_store_holds(tmp_path / "store")


def test_endless_throttling_abandons_the_source_and_the_next_one_fills_in(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with s3_proxy(monkeypatch, aws_env, slowdown=10**6) as proxy:
        source = s3(attempts=2)
        backup = MemorySource(FILES)
        sync_store(tmp_path / "store", MANIFEST, [source, backup])
        assert proxy.body_bytes == 0
    assert source.abandoned is not None
    assert "503 SlowDown" in source.abandoned
    assert backup.bytes_served == sum(map(len, FILES.values()))
    assert_store_holds(tmp_path / "store")


async def test_missing_credentials_are_a_clear_error(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    source = s3(attempts=1)
    with pytest.raises(SourceError, match="no usable credentials for s3://kensho-models"):
        await _fetch_all(source, "tok.json", len(FILES["tok.json"]))
    assert source.abandoned is not None


async def test_sources_share_the_botocore_loader_but_read_credentials_each_anew(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service models are parsed once per process; the credentials chain is not
    cached with them: a source made after the credentials went away says so."""
    first = s3(attempts=1)
    assert await _fetch_all(first, "tok.json", len(FILES["tok.json"])) == FILES["tok.json"]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    second = s3(attempts=1)
    with pytest.raises(SourceError, match="no usable credentials for s3://kensho-models"):
        await _fetch_all(second, "tok.json", len(FILES["tok.json"]))
    loaders = {
        id(src._filesystem().session.get_component("data_loader"))  # type: ignore[attr-defined]
        for src in (first, second)
    }
    assert len(loaders) == 1


async def test_an_endpoint_that_is_down_is_unreachable(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    source = s3(attempts=1, timeout=2)
    with pytest.raises(SourceUnreachableError, match="cannot connect to s3://kensho-models"):
        await _fetch_all(source, "tok.json", len(FILES["tok.json"]))


@pytest.mark.parametrize(("url", "package"), [("gs://b/p", "gcsfs"), ("az://c/p", "adlfs")])
async def test_a_scheme_whose_package_is_missing_names_it(url: str, package: str) -> None:
    source = source_from_string(url)
    with pytest.raises(SourceError, match=f"need the {package} package.*pip install {package}"):
        await asyncio.wait_for(_fetch_all(source, "x", 1), 10)  # type: ignore[arg-type]


def test_an_object_store_url_without_a_bucket_is_refused() -> None:
    with pytest.raises(SourceError, match="names no bucket"):
        ObjectStoreSource("s3:///prefix")


# -- the release channel: manifest.json at the prefix root ---------------------------

V1 = {"w.bin": os.urandom(16 * 4096), "config.json": b'{"layers": 2}'}
V2 = {"w.bin": V1["w.bin"][: 12 * 4096] + os.urandom(4 * 4096), "config.json": V1["config.json"]}


def publish(moto: str, prefix: str, files: dict[str, bytes]) -> None:
    """Upload ``files`` under ``prefix`` as a release pipeline would (boto3, not Kensho)."""
    client = boto3.client(
        "s3",
        endpoint_url=moto,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for rel, data in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)


async def test_a_release_in_the_bucket_is_found_staged_and_then_costs_one_head(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    m2 = release(V2, 2)
    publish(aws_env, "ota-new", published(m2, V2))
    with s3_proxy(monkeypatch, aws_env) as proxy:
        store = manager(tmp_path, [s3(f"s3://{BUCKET}/ota-new")])
        channel = ReleaseChannel(store.sources, store._trust, Recorder())
        first = await channel.check()
        polled = len(proxy.calls)
        second = await channel.check()
        unchanged_poll = proxy.calls[polled:]
        staged = await Prefetcher(store, emit=Recorder()).stage(m2)
        await store.aclose()
    assert first.result == "new" and first.manifest is not None
    assert first.manifest.serial == 2 and first.source == f"s3://{BUCKET}/ota-new"
    assert second.result == "unchanged"
    assert unchanged_poll == [("HEAD", f"/{BUCKET}/ota-new/manifest.json")], (
        "an unchanged channel costs one small request"
    )
    assert staged.outcome == "staged" and staged.fetched == 4 * 4096  # the changed chunks


async def test_a_refused_release_in_the_bucket_is_reported_once_and_never_staged(
    tmp_path: Path, aws_env: str
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    publish(aws_env, "ota-forged", published(release(V2, 2, key=None), V2))  # unsigned
    store = manager(tmp_path, [s3(f"s3://{BUCKET}/ota-forged")])
    seen = Recorder()
    channel = ReleaseChannel(store.sources, store._trust, seen)
    results = [await channel.check() for _ in range(2)]
    await store.aclose()
    assert [r.result for r in results] == ["refused", "refused"]
    (refusal,) = seen.of(ReleaseRefused)
    assert refusal.serial == 2 and "signature" in refusal.reason
    assert not (tmp_path / ".kensho" / "staging").exists()
    assert (tmp_path / "w.bin").read_bytes() == V1["w.bin"]


async def test_a_prefix_without_manifest_json_publishes_no_release(
    tmp_path: Path, aws_env: str
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    source = s3()  # the prefix of the sync tests: files, no manifest.json
    store = manager(tmp_path, [source])
    result = await ReleaseChannel(store.sources, store._trust, Recorder()).check()
    await store.aclose()
    assert result.result == "none"
    assert "release/manifest.json is not in the bucket" in result.detail
    assert "publishes no release" in result.detail
    assert source.abandoned is None, "a poll abandons nothing: the files still come from it"


async def test_a_manifest_over_the_limit_is_refused_before_its_body_is_read(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    publish(aws_env, "ota-big", {"manifest.json": b" " * 5000})
    with s3_proxy(monkeypatch, aws_env) as proxy:
        store = manager(tmp_path, [s3(f"s3://{BUCKET}/ota-big")])
        channel = ReleaseChannel(store.sources, store._trust, Recorder(), max_bytes=4096)
        result = await channel.check()
        await store.aclose()
        assert [method for method, _ in proxy.calls] == ["HEAD"]
    assert result.result == "none" and "larger than 4096 bytes" in result.detail


async def test_no_such_bucket_is_a_clear_poll_result_and_abandons_nothing(
    tmp_path: Path, aws_env: str
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    source = s3("s3://no-such-bucket/ota")
    store = manager(tmp_path, [source])
    result = await ReleaseChannel(store.sources, store._trust, Recorder()).check()
    await store.aclose()
    assert result.result == "none" and "the bucket 'no-such-bucket' does not exist" in result.detail
    assert source.abandoned is None
