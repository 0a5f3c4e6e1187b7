"""Shared helpers for the storage tests: file trees, manifests, a real HTTP server.

The server is a threaded ``http.server`` on 127.0.0.1 that serves a dict of files with
``Range`` support (and an ``ETag``, answering a matching ``If-None-Match`` with 304)
and counts every body byte it sends; a test publishes a release by putting
``manifest.json`` into ``state.files`` (under ``state.lock``). Behaviours (503s, wrong bytes,
ignoring Range, hanging, pausing mid-body) are switched per test. It stops itself at
the end of the ``with`` block, releasing any handler that is blocked.
"""

from __future__ import annotations

import errno
import hashlib
import re
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from _server_support import clean_env, run_kensho
from kensho.storage import Manifest, PartWriter, parse_manifest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FullDisk(PartWriter):
    """A store on a full disk: every write into a partial file fails with ``ENOSPC``.

    Given as a ``StorageManager``'s ``part_writer``: the build layer's one write
    seam, so it fails local copies and fetched chunks, for repairs and updates.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []  # which write paths were reached

    def write(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        self.calls.append("write")
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_pieces(self, fd: int, pieces: list[bytes], offset: int) -> None:
        self.calls.append("write_pieces")
        raise OSError(errno.ENOSPC, "No space left on device")


def write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def signed_for(files: Mapping[str, bytes], chunk_size: int, **extra: Any) -> dict[str, Any]:
    entries = []
    for rel, data in sorted(files.items()):
        chunks = [
            {
                "offset": off,
                "size": len(data[off : off + chunk_size]),
                "sha256": sha(data[off : off + chunk_size]),
            }
            for off in range(0, len(data), chunk_size)
        ]
        entries.append(
            {
                "path": rel,
                "size": len(data),
                "sha256": sha(data),
                "version": "1.0.0",
                "changelog": "",
                "required": True,
                "chunks": chunks,
            }
        )
    signed: dict[str, Any] = {
        "schema": 1,
        "name": "demo",
        "version": "1.0.0",
        "serial": 1,
        "created": "2026-11-25T10:00:00Z",
        "files": entries,
    }
    signed.update(extra)
    return signed


def manifest_for(
    files: Mapping[str, bytes], chunk_size: int = 4096, optional: tuple[str, ...] = ()
) -> Manifest:
    signed = signed_for(files, chunk_size)
    for entry in signed["files"]:
        if entry["path"] in optional:
            entry["required"] = False
    return parse_manifest({"signed": signed, "signatures": []})


@dataclass
class ServerState:
    files: dict[str, bytes]
    fail_first: int = 0  # answer 503 to this many requests first
    retry_after: str | None = "0"
    ignore_range: bool = False
    corrupt: bool = False  # flip a byte of every body
    hang: bool = False  # never answer (until the server stops)
    pause_after: int | None = None  # send this many body bytes, then wait for `resume`
    redirect: bool = False  # /r/<path> redirects to /<path>
    bytes_served: int = 0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    resume: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        st = self.server.state
        path = unquote(self.path.lstrip("/"))
        rng = self.headers.get("Range")
        with st.lock:
            st.requests.append((path, rng))
            fail = st.fail_first > 0
            if fail:
                st.fail_first -= 1
        if st.hang:
            st.stopping.wait(30)
            return
        if fail:
            self._status(503, headers={"Retry-After": st.retry_after} if st.retry_after else {})
            return
        if st.redirect and path.startswith("r/"):
            self._status(302, headers={"Location": "/" + path[2:]})
            return
        with st.lock:
            data = st.files.get(path)
        if data is None:
            self._status(404)
            return
        etag = f'"{sha(data)[:16]}"'
        if rng is None and self.headers.get("If-None-Match") == etag:
            self._status(304, headers={"ETag": etag})  # a conditional GET: unchanged
            return
        start, end = 0, len(data)
        status = 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not st.ignore_range:
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            if start >= len(data):
                self._status(416)
                return
            status = 206
        body = bytearray(data[start:end])
        if st.corrupt and body:
            body[len(body) // 2] ^= 0xFF
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("ETag", etag)
        self.end_headers()
        with st.lock:
            st.statuses.append(status)
        self._send(bytes(body))

    def _send(self, body: bytes) -> None:
        st = self.server.state
        view = memoryview(body)
        step = 64 * 1024
        for i in range(0, len(view), step):
            piece = view[i : i + step]
            with st.lock:
                pause = st.pause_after is not None and st.bytes_served + len(piece) > st.pause_after
            if pause:
                st.paused.set()
                st.resume.wait(30)
                if st.stopping.is_set():
                    return
                with st.lock:
                    st.pause_after = None
            try:
                self.wfile.write(piece)
            except OSError:
                return
            with st.lock:
                st.bytes_served += len(piece)

    def _status(self, code: int, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()
        with self.server.state.lock:
            self.server.state.statuses.append(code)


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    state: ServerState


@contextmanager
def http_server(files: Mapping[str, bytes], **behaviour: Any) -> Iterator[tuple[str, ServerState]]:
    """Serve ``files`` at ``http://127.0.0.1:PORT/``; yields (base URL, state)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = ServerState(files=dict(files), **behaviour)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server.state
    finally:
        server.state.stopping.set()
        server.state.resume.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def kensho(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the ``kensho`` command in a subprocess, wide enough for tables (the one
    runner of :mod:`_server_support`, so outside KENSHO_* variables stay out)."""
    return run_kensho(*args, cwd=cwd, env=clean_env(COLUMNS="400"), timeout=50)
