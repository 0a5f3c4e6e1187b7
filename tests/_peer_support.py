"""Peers for the tests: a real ``kensho share`` app on 127.0.0.1, and a lying one.

:func:`share_server` runs the real share app (uvicorn, in a thread) over a store;
:func:`lying_peer` answers the chunk route the way a broken or hostile peer would
(wrong bytes, wrong length, a body longer than the chunk, an endless one, one cut
off mid-chunk), counting every request. :func:`synced_store` builds a store the way
``kensho sync`` does, so the shelf sees verified files.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uvicorn

from kensho.config import ShareSettings
from kensho.server import ChunkService, create_share_app
from kensho.storage import Manifest, StorageManager
from kensho.storage.sources import MemorySource, Source


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextmanager
def share_server(
    root: Path, *, api_key: str | None = None, settings: ShareSettings | None = None
) -> Iterator[tuple[str, ChunkService]]:
    """Serve ``root``'s verified chunks on 127.0.0.1; yields (``peer+http://`` URL, service)."""
    service = ChunkService.for_store(root, settings or ShareSettings())
    config = uvicorn.Config(
        create_share_app(service, api_key=api_key),
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(20), "the share server did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"peer+http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(20)
        service.close()


def sync_store(root: Path, manifest: Manifest, sources: Sequence[Source]) -> StorageManager:
    """Verify and repair ``root`` against ``manifest`` from ``sources`` (a ``kensho sync``)."""

    async def run() -> StorageManager:
        manager = StorageManager(root, manifest, sources)
        try:
            async for _ in manager.initialize_and_verify():
                pass
        finally:
            await manager.aclose()
        return manager

    return asyncio.run(run())


def synced_store(root: Path, manifest: Manifest, files: Mapping[str, bytes]) -> None:
    """A store at ``root`` holding ``files``, verified against ``manifest``."""
    sync_store(root, manifest, [MemorySource(files)])


@dataclass
class LiarState:
    chunks: dict[str, bytes]
    mode: str  # wrong, short-length, long, endless, vanish, missing
    requests: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _LiarHandler(BaseHTTPRequestHandler):
    server: _LiarServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        st = self.server.state
        sha = self.path.rsplit("/", 1)[-1]
        with st.lock:
            st.requests.append(sha)
        data = st.chunks.get(sha)
        if data is None or st.mode == "missing":
            self._reply(404, b'{"error": {"message": "no such chunk"}}')
            return
        if st.mode == "wrong":
            body = bytearray(data)
            body[len(body) // 2] ^= 0xFF
            self._reply(200, bytes(body))
        elif st.mode == "short-length":
            self._reply(200, data[:-1])
        elif st.mode == "long":
            self._reply(200, data + b"extra bytes")
        elif st.mode == "endless":
            self._endless(data)
        elif st.mode == "vanish":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, data: bytes) -> None:
        """The right bytes, then more, forever: no length, the connection never ends."""
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self.wfile.write(data)
            while not self.server.state.stopping.is_set():
                self.wfile.write(b"\0" * 65536)
        except OSError:
            return


class _LiarServer(ThreadingHTTPServer):
    daemon_threads = True
    state: LiarState


@contextmanager
def lying_peer(chunks: Mapping[str, bytes], mode: str) -> Iterator[tuple[str, LiarState]]:
    """A peer holding ``chunks`` (sha256 -> bytes) that answers in ``mode``."""
    server = _LiarServer(("127.0.0.1", 0), _LiarHandler)
    server.state = LiarState(dict(chunks), mode)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"peer+http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        server.state.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
