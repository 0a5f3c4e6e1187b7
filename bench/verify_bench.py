"""Integrity store benchmark: Kensho vs a hashlib loop vs sha256sum, and sync vs curl.

One run, same files for every contender (about 2 GB in a temp dir: 3 large files and
512 small ones), page cache warm for everyone (each measurement is repeated and the
median kept; the first, cold pass is discarded). Prints a markdown table.

    .venv/bin/python bench/verify_bench.py [--scale 1.0]

Measurements:
- full verify: ``StorageManager.verify(full=True)`` (parallel chunk hashing) against a
  single-threaded ``hashlib`` loop over 1 MiB reads and against coreutils ``sha256sum``;
- warm verify: the stat fast path over 1,000 files already verified once;
- sync: ``initialize_and_verify`` of an empty store from a local HTTP server (Range,
  chunk hashing, temp file, fsync, rename) against ``curl`` downloading the same bytes
  from the same server to files, with and without an fsync of what curl wrote (Kensho
  always makes a placed file durable before it reports it good).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from kensho.storage import HttpSource, Manifest, StorageManager, build_manifest
from kensho.telemetry import configure_logging

MiB = 1024 * 1024


def median_time(
    func: Callable[[], object], runs: int, setup: Callable[[], object] = lambda: None
) -> float:
    """Median wall time of ``func`` over ``runs`` runs; ``setup`` runs untimed before each."""
    setup()
    func()  # warm-up: page cache, imports, thread pools
    times = []
    for _ in range(runs):
        setup()
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_files(folder: Path, large: int, large_size: int, small: int, small_size: int) -> None:
    block = os.urandom(16 * MiB)
    for i in range(large):
        path = folder / "large" / f"model-{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            written = 0
            while written < large_size:
                piece = block[: min(len(block), large_size - written)]
                fh.write(i.to_bytes(8, "little") + piece[8:])
                written += len(piece)
    for i in range(small):
        path = folder / "small" / f"{i // 100:03d}" / f"file-{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        start = (i * 4099) % (len(block) - small_size)
        path.write_bytes(i.to_bytes(8, "little") + block[start + 8 : start + small_size])


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".kensho" not in p.parts)


def hashlib_loop(paths: list[Path]) -> None:
    buf = bytearray(MiB)
    view = memoryview(buf)
    for path in paths:
        digest = hashlib.sha256()
        with path.open("rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                digest.update(view[:n])
        digest.hexdigest()


def sha256sum(paths: list[Path]) -> None:
    subprocess.run(["sha256sum", *map(str, paths)], check=True, stdout=subprocess.DEVNULL)


async def kensho_verify(root: Path, manifest: Manifest, *, full: bool) -> None:
    async with StorageManager(root, manifest) as manager:
        async for _ in manager.verify(full=full):
            pass
        assert manager.report is not None and manager.report.ok


class _RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.root / self.path.lstrip("/")
        size = path.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start, end = int(first), int(last) if last else size - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with path.open("rb") as fh:
            self.connection.sendfile(fh, start, end - start + 1)


def serve(root: Path) -> tuple[ThreadingHTTPServer, threading.Thread]:
    handler = type("Handler", (_RangeHandler,), {"root": root})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server, thread


async def kensho_sync(root: Path, manifest: Manifest, url: str) -> None:
    async with StorageManager(root, manifest, [HttpSource(url)]) as manager:
        async for _ in manager.initialize_and_verify():
            pass


async def httpx_ceiling(urls: list[str]) -> None:
    """Stream the same bytes with bare httpx into nothing: the ceiling for HttpSource."""
    async with httpx.AsyncClient() as client:
        for url in urls:
            async with client.stream("GET", url) as resp:
                async for _ in resp.aiter_raw():
                    pass


def curl(urls: list[str], out: Path) -> None:
    args = ["curl", "-sSf"]
    for i, url in enumerate(urls):
        args += ["-o", str(out / f"f{i}"), url]
    subprocess.run(args, check=True)


def fresh(folder: Path, *, make: bool) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if make:
        folder.mkdir()
    os.sync()


def fsync_all(folder: Path) -> None:
    """What Kensho does for durability, applied to curl's output: fsync files, folder."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def row(name: str, seconds: float, nbytes: int | None, ratio: str, target: str) -> str:
    speed = f"{nbytes / seconds / 1e9:.2f} GB/s" if nbytes else ""
    shown = f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
    return f"| {name} | {shown} | {speed} | {ratio} | {target} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply data sizes")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    configure_logging(level="warning")
    large_size = int(512 * MiB * args.scale)
    with tempfile.TemporaryDirectory(prefix="kensho-bench-") as tmp:
        base = Path(tmp)
        data = base / "data"
        make_files(data, 3, large_size, 512, MiB)
        manifest = asyncio.run(build_manifest(data, name="bench", version="1"))
        paths = all_files(data)
        total = sum(p.stat().st_size for p in paths)

        t_kensho = median_time(
            lambda: asyncio.run(kensho_verify(data, manifest, full=True)), args.runs
        )
        t_hashlib = median_time(lambda: hashlib_loop(paths), args.runs)
        t_sum = median_time(lambda: sha256sum(paths), args.runs)

        many = base / "many"
        for i in range(1000):
            path = many / f"{i // 100:02d}" / f"f{i}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(4096))
        many_manifest = asyncio.run(build_manifest(many, name="many", version="1"))
        asyncio.run(kensho_verify(many, many_manifest, full=True))
        t_warm = median_time(lambda: asyncio.run(kensho_verify(many, many_manifest, full=False)), 5)

        large = [f for f in manifest.files if f.path.startswith("large/")]
        sync_manifest = Manifest(
            schema=1,
            name="bench",
            version="1",
            serial=1,
            created=manifest.created,
            expires=None,
            min_client_version=None,
            files=tuple(large),
        )
        sync_bytes = sum(f.size for f in large)
        server, thread = serve(data)
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/"
            store, out = base / "store", base / "curl"
            urls = [url + f.path for f in large]
            # Untimed before each run: delete the last copy and flush dirty pages, so no
            # run pays for the previous one's write-back.
            t_sync = median_time(
                lambda: asyncio.run(kensho_sync(store, sync_manifest, url)),
                args.runs,
                setup=lambda: fresh(store, make=False),
            )
            t_curl = median_time(
                lambda: curl(urls, out), args.runs, setup=lambda: fresh(out, make=True)
            )
            t_httpx = median_time(lambda: asyncio.run(httpx_ceiling(urls)), args.runs)
            t_curl_durable = median_time(
                lambda: (curl(urls, out), fsync_all(out)),
                args.runs,
                setup=lambda: fresh(out, make=True),
            )
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    print(f"\nKensho integrity store: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(
        f"{total / 1e9:.2f} GB in {len(paths)} files (3 x {large_size // MiB} MiB + 512 x 1 MiB), "
        f"warm page cache, median of {args.runs} runs\n"
    )
    print("| measurement | median time | throughput | ratio | target |")
    print("|---|---|---|---|---|")
    print(row("hashlib loop, 1 thread (baseline)", t_hashlib, total, "1.00x", ""))
    print(row("sha256sum", t_sum, total, f"{t_hashlib / t_sum:.2f}x hashlib", ""))
    print(
        row(
            "Kensho full verify",
            t_kensho,
            total,
            f"{t_hashlib / t_kensho:.2f}x hashlib",
            ">= 0.9x hashlib",
        )
    )
    print(row("Kensho warm verify, 1,000 files", t_warm, None, "", "< 50 ms"))
    print(row(f"curl, {len(large)} files over HTTP", t_curl, sync_bytes, "1.00x", ""))
    print(
        row(
            "curl, then fsync (Kensho's durability)",
            t_curl_durable,
            sync_bytes,
            f"{t_curl / t_curl_durable:.2f}x curl",
            "",
        )
    )
    print(
        row(
            "bare httpx stream, no disk, no hash (ceiling)",
            t_httpx,
            sync_bytes,
            f"{t_curl / t_httpx:.2f}x curl",
            "",
        )
    )
    print(
        row(
            "Kensho sync, same files",
            t_sync,
            sync_bytes,
            f"{t_curl / t_sync:.2f}x curl",
            ">= 0.8x curl",
        )
    )


if __name__ == "__main__":
    main()
