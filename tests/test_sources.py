"""Sources against real folders and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from _storage_support import http_server, write_tree
from kensho.errors import DownloadError, SourceError
from kensho.storage.sources import (
    HttpSource,
    MemorySource,
    MirrorSource,
    SourceUnreachableError,
    source_from_string,
)

DATA = os.urandom(300_000)


class Collect:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.calls = 0

    async def __call__(self, data: bytes) -> None:
        self.calls += 1
        self.buf += data


def fast_http(url: str, **kw: float) -> HttpSource:
    opts: dict[str, float] = {"wait_initial": 0.01, "wait_max": 0.05, "wait_jitter": 0.0}
    opts.update(kw)
    return HttpSource(url, **opts)  # type: ignore[arg-type]


async def test_mirror_reads_a_range(tmp_path: Path) -> None:
    write_tree(tmp_path, {"m/w.bin": DATA})
    sink = Collect()
    await MirrorSource(tmp_path).fetch("m/w.bin", 1000, 5000, len(DATA), sink)
    assert bytes(sink.buf) == DATA[1000:6000]


async def test_mirror_accepts_file_url(tmp_path: Path) -> None:
    write_tree(tmp_path, {"w.bin": DATA})
    sink = Collect()
    src = source_from_string(tmp_path.as_uri())
    assert isinstance(src, MirrorSource)
    await src.fetch("w.bin", 0, len(DATA), len(DATA), sink)
    assert bytes(sink.buf) == DATA
    await src.aclose()


async def test_mirror_missing_folder_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnreachableError, match="is not there"):
        await MirrorSource(tmp_path / "usb").fetch("w.bin", 0, 1, 1, Collect())


async def test_mirror_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not in the mirror"):
        await MirrorSource(tmp_path).fetch("w.bin", 0, 1, 1, Collect())


async def test_mirror_other_size_is_refused_before_reading(tmp_path: Path) -> None:
    write_tree(tmp_path, {"w.bin": DATA})
    sink = Collect()
    with pytest.raises(DownloadError, match="manifest declares 5"):
        await MirrorSource(tmp_path).fetch("w.bin", 0, 5, 5, sink)
    assert sink.calls == 0


async def test_mirror_symlink_leaving_the_mirror_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "w.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(SourceError, match="outside the mirror"):
        await MirrorSource(mirror).fetch("w.bin", 0, 6, 6, Collect())


async def test_http_range_request_sends_only_the_range() -> None:
    with http_server({"m/w.bin": DATA}) as (url, state):
        src = fast_http(url)
        sink = Collect()
        await src.fetch("m/w.bin", 100_000, 50_000, len(DATA), sink)
        await src.aclose()
    assert bytes(sink.buf) == DATA[100_000:150_000]
    assert state.bytes_served == 50_000
    assert state.requests == [("m/w.bin", "bytes=100000-149999")]


async def test_http_server_ignoring_range_is_handled() -> None:
    with http_server({"w.bin": DATA}, ignore_range=True) as (url, state):
        src = fast_http(url)
        sink = Collect()
        await src.fetch("w.bin", 200_000, 10_000, len(DATA), sink)
        await src.aclose()
    assert bytes(sink.buf) == DATA[200_000:210_000]
    assert state.statuses == [200]


async def test_http_503_twice_then_ok() -> None:
    with http_server({"w.bin": DATA}, fail_first=2) as (url, state):
        src = fast_http(url)
        sink = Collect()
        await src.fetch("w.bin", 0, len(DATA), len(DATA), sink)
        await src.aclose()
    assert bytes(sink.buf) == DATA
    assert state.statuses == [503, 503, 200]


async def test_http_503_forever_gives_up_with_clear_error() -> None:
    with http_server({"w.bin": DATA}, fail_first=100) as (url, state):
        src = fast_http(url, attempts=3)
        with pytest.raises(SourceError, match="HTTP 503 3 times"):
            await src.fetch("w.bin", 0, 10, len(DATA), Collect())
        await src.aclose()
    assert len(state.requests) == 3


async def test_http_404_is_not_retried() -> None:
    with http_server({}) as (url, state):
        src = fast_http(url)
        with pytest.raises(SourceError, match="404"):
            await src.fetch("nope.bin", 0, 10, 10, Collect())
        await src.aclose()
    assert len(state.requests) == 1


async def test_http_hang_times_out() -> None:
    with http_server({"w.bin": DATA}, hang=True) as (url, state):
        src = fast_http(url, read_timeout=0.3, attempts=2)
        with pytest.raises(DownloadError, match="stopped sending"):
            await src.fetch("w.bin", 0, 10, len(DATA), Collect())
        await src.aclose()
    assert len(state.requests) == 2


async def test_http_connection_refused_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = fast_http(f"http://127.0.0.1:{port}/", attempts=2)
    with pytest.raises(SourceUnreachableError, match="cannot connect"):
        await src.fetch("w.bin", 0, 10, 10, Collect())
    await src.aclose()


async def test_http_follows_redirects() -> None:
    with http_server({"w.bin": DATA}, redirect=True) as (url, state):
        src = fast_http(url + "r/")
        sink = Collect()
        await src.fetch("w.bin", 0, 100, len(DATA), sink)
        await src.aclose()
    assert bytes(sink.buf) == DATA[:100]
    assert state.statuses == [302, 206]


async def test_http_other_size_is_refused() -> None:
    with http_server({"w.bin": DATA}) as (url, _):
        src = fast_http(url)
        sink = Collect()
        with pytest.raises(DownloadError, match="manifest declares 10"):
            await src.fetch("w.bin", 0, 10, 10, sink)
        await src.aclose()
    assert sink.calls == 0


async def test_http_sink_errors_are_not_retried() -> None:
    async def failing_sink(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    with http_server({"w.bin": DATA}) as (url, state):
        src = fast_http(url)
        with pytest.raises(OSError, match="No space"):
            await src.fetch("w.bin", 0, len(DATA), len(DATA), failing_sink)
        await src.aclose()
    assert len(state.requests) == 1


async def test_http_wrong_bytes_are_delivered_as_is() -> None:
    """A source only moves bytes; catching bad ones is the manager's job (tested there)."""
    with http_server({"w.bin": DATA}, corrupt=True) as (url, _):
        src = fast_http(url)
        sink = Collect()
        await src.fetch("w.bin", 0, len(DATA), len(DATA), sink)
        await src.aclose()
    assert len(sink.buf) == len(DATA) and bytes(sink.buf) != DATA


async def test_memory_source_counts_and_handler() -> None:
    src = MemorySource({"a": b"0123456789"})
    sink = Collect()
    await src.fetch("a", 2, 3, 10, sink)
    assert bytes(sink.buf) == b"234" and src.bytes_served == 3 and src.requests == [("a", 2, 3)]

    def boom(path: str, offset: int, length: int) -> bytes:
        raise SourceError("down")

    with pytest.raises(SourceError):
        await MemorySource(handler=boom).fetch("a", 0, 1, 1, Collect())


def test_source_from_string() -> None:
    assert isinstance(source_from_string("/media/usb"), MirrorSource)
    with pytest.raises(SourceError, match="unsupported source"):
        source_from_string("ftp://example.org/")


async def test_hostile_retry_after_is_ignored_not_a_crash() -> None:
    from kensho.storage.sources.http import _parse_retry_after

    assert _parse_retry_after("\xb2") is None  # "²" passes str.isdigit()
    assert _parse_retry_after("7") == 7.0


async def test_mirror_read_error_falls_over_to_the_next_source(tmp_path: Path) -> None:
    from kensho.errors import SourceError
    from kensho.storage import MirrorSource

    mirror = tmp_path / "mirror"
    (mirror / "w.bin").mkdir(parents=True)  # not a regular file where the data should be
    source = MirrorSource(mirror)
    with pytest.raises(SourceError, match="not a regular file"):
        await source.fetch("w.bin", 0, 4096, 4096, _ignore)


async def _ignore(_: bytes) -> None:
    return None


async def test_a_range_that_keeps_progressing_is_never_abandoned() -> None:
    """Each response delivers one piece, then the connection drops: more drops than the
    retry budget, but every attempt made progress, so the download completes."""
    import httpx

    from kensho.storage import HttpSource

    data = bytes(range(256)) * 64  # 16 KiB
    piece = 1024

    class OnePieceThenDrop(httpx.AsyncByteStream):
        def __init__(self, chunk: bytes) -> None:
            self.chunk = chunk

        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield self.chunk
            raise httpx.ReadError("connection reset by peer")

    def handler(request: httpx.Request) -> httpx.Response:
        start = int(request.headers["Range"].removeprefix("bytes=").split("-")[0])
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        return httpx.Response(
            206, headers=headers, stream=OnePieceThenDrop(data[start : start + piece])
        )

    source = HttpSource(
        "http://mirror.test/",
        transport=httpx.MockTransport(handler),
        attempts=2,
        wait_initial=0.0,
        wait_max=0.0,
        wait_jitter=0.0,
    )
    received = bytearray()

    async def sink(chunk: bytes) -> None:
        received.extend(chunk)

    try:
        await source.fetch("w.bin", 1, len(data) - 1, len(data), sink)
    finally:
        await source.aclose()
    assert bytes(received) == data[1:]
