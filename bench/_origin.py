"""A static file server on 127.0.0.1 for the benchmarks: single and multi-range ``GET``,
counting every body byte it sends (what "bytes served by the origin" means)."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

__all__ = ["serve"]

MiB = 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.server.folder / unquote(self.path.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            size = os.fstat(fd).st_size
            ranges = self._ranges(size)
            self.server.requests += 1
            if not ranges:
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self._copy(fd, 0, size)
            elif len(ranges) == 1:
                start, end = ranges[0]
                self.send_response(206)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                self._copy(fd, start, end)
            else:
                self._multipart(fd, ranges, size)
        finally:
            os.close(fd)

    def _ranges(self, size: int) -> list[tuple[int, int]]:
        header = self.headers.get("Range", "")
        if not header.startswith("bytes="):
            return []
        out = []
        for part in header[6:].split(","):
            m = re.fullmatch(r"\s*(\d+)-(\d*)\s*", part)
            if m:
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                out.append((int(m.group(1)), end))
        return out

    def _multipart(self, fd: int, ranges: list[tuple[int, int]], size: int) -> None:
        boundary = "kenshobenchboundary"
        heads = [
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {s}-{e - 1}/{size}\r\n\r\n".encode()
            for s, e in ranges
        ]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(map(len, heads)) + sum(e - s for s, e in ranges) + len(tail)
        self.send_response(206)
        self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        for head, (s, e) in zip(heads, ranges, strict=True):
            self._write(head)
            self._copy(fd, s, e)
        self._write(tail)

    def _copy(self, fd: int, start: int, end: int) -> None:
        pos = start
        while pos < end:
            piece = os.pread(fd, min(MiB, end - pos), pos)
            if not piece:
                return
            self._write(piece)
            pos += len(piece)

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        with self.server.lock:
            self.server.bytes_served += len(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    folder: Path
    bytes_served: int
    requests: int
    lock: threading.Lock


@contextmanager
def serve(folder: Path) -> Iterator[tuple[str, _Server]]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.folder, server.bytes_served, server.requests = folder, 0, 0
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
