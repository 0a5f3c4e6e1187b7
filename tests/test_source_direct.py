"""The thread path of the HTTP source (plain http://): real servers on 127.0.0.1.

The common behaviour (statuses, ranges, retries, timeouts, redirects, sizes) is the
same test suite as httpx's path (tests/test_sources.py, test_source_failover.py run
on it); these are what only the thread path has: kept-alive connections, a server
that closed one meanwhile, cancellation of a blocked read, proxies left to httpx.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from _storage_support import http_server
from kensho.storage.sources import HttpSource
from kensho.storage.sources._direct import direct_capable

DATA = os.urandom(3 * 1024 * 1024 + 5)  # more than one 1 MiB read


class Collect:
    def __init__(self) -> None:
        self.buf = bytearray()

    async def __call__(self, data: bytes) -> None:
        self.buf += data


class _KeepAliveHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _KeepAliveServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(first), int(last) + 1
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(DATA)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self.wfile.write(DATA[start:end])
        if self.server.close_after_each:
            self.close_connection = True  # closes without saying so (no Connection: close)


class _KeepAliveServer(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    close_after_each = False
    lock = threading.Lock()


@contextmanager
def keep_alive_server(*, close_after_each: bool = False) -> Iterator[tuple[str, Any]]:
    server = _KeepAliveServer(("127.0.0.1", 0), _KeepAliveHandler)
    server.close_after_each = close_after_each
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


async def test_consecutive_ranges_reuse_one_kept_alive_connection() -> None:
    with keep_alive_server() as (url, server):
        src = HttpSource(url)
        sinks = [Collect() for _ in range(3)]
        for k, sink in enumerate(sinks):
            await src.fetch("w.bin", k * 1_000_000, 1_000_000, len(DATA), sink)
        await src.aclose()
        assert server.connections == 1
    assert [bytes(s.buf) for s in sinks] == [DATA[k * 1_000_000 :][:1_000_000] for k in range(3)]


async def test_a_kept_alive_connection_the_server_closed_is_replaced_without_a_retry() -> None:
    """The server closes after each answer without saying so: the second range finds
    a dead connection and is sent again at once on a new one (no retry spent)."""
    with keep_alive_server(close_after_each=True) as (url, server):
        src = HttpSource(url, attempts=1)  # a retry would be an error here
        first, second = Collect(), Collect()
        await src.fetch("w.bin", 0, 10, len(DATA), first)
        await src.fetch("w.bin", 10, len(DATA) - 10, len(DATA), second)
        await src.aclose()
        assert server.connections == 2
    assert bytes(first.buf + second.buf) == DATA


async def test_cancelling_a_blocked_read_ends_it_without_waiting_for_the_timeout() -> None:
    """A body stalls mid-way; the read timeout is far away (1000 s): cancelling the
    fetch shuts the socket, so the worker thread returns and the task ends."""
    with http_server({"w.bin": DATA}, pause_after=100_000) as (url, state):
        src = HttpSource(url, read_timeout=1000.0)
        task = asyncio.create_task(src.fetch("w.bin", 0, len(DATA), len(DATA), Collect()))
        assert await asyncio.to_thread(state.paused.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)  # bounded: without the shutdown, 1000 s
        await asyncio.wait_for(src.aclose(), 20)
    # Whatever the cancellation cut (the head being read, or the body), no socket is
    # left for the garbage collector: collected now, a leak fails this test (a
    # ResourceWarning is an error here), not a later one.
    gc.collect()


def test_only_plain_http_without_a_proxy_takes_the_thread_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert direct_capable("http://127.0.0.1:8000/models/")
    assert not direct_capable("https://mirror.example/models/")  # TLS settings: httpx's
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not direct_capable("http://mirror.example/models/")  # the proxy: httpx's
    monkeypatch.setenv("NO_PROXY", "mirror.example")
    assert direct_capable("http://mirror.example/models/")
