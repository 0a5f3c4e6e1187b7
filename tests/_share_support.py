"""``kensho share`` and ``kensho sync`` as real processes, for the peer tests.

The same seed files, the same sync command and the same way of starting a share
server and waiting until it listens serve the plain peer tests and the mDNS ones.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _server_support import Server, _pump, kensho_env, kensho_popen, run_kensho
from _storage_support import signed_for

__all__ = ["FILES", "kensho_share", "sync"]

FILES = {"models/w.bin": os.urandom(200_000), "tok.json": os.urandom(30_000)}


def sync(tmp_path: Path, root: Path, *sources: str) -> subprocess.CompletedProcess[str]:
    """``kensho sync`` of :data:`FILES` into ``root`` from ``sources``, in order."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"signed": signed_for(FILES, 16_384), "signatures": []}))
    args: list[str] = ["sync", "-m", str(manifest), "-r", str(root)]
    for url in sources:
        args += ["-s", url]
    env = kensho_env(tmp_path / "data", port=None, COLUMNS="300")
    return run_kensho(*args, env=env, cwd=tmp_path, timeout=50)


@contextmanager
def kensho_share(tmp_path: Path, root: Path, *flags: str) -> Iterator[Server]:
    """Run ``kensho share --root ROOT --port 0 FLAGS``; yield it once it listens
    (``Server.url``), its output kept; stopped (SIGTERM) on the way out."""
    process = kensho_popen(
        "share",
        "--root",
        root,
        "--port",
        "0",
        *flags,
        env=kensho_env(tmp_path / "data", port=None),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Server(process, url="")
    out: queue.Queue[str | None] = queue.Queue()
    threads = [
        threading.Thread(target=_pump, args=(stream, sink, lines), daemon=True)
        for stream, sink, lines in [
            (process.stdout, server.stdout, out),
            (process.stderr, server.stderr, server.stderr_lines),
        ]
    ]
    for thread in threads:
        thread.start()
    try:
        line = out.get(timeout=60)
        assert line is not None and line.startswith("kensho share: serving "), server.stderr
        server.url = line.split()[-1]
        yield server
    finally:
        server.stop()
        for thread in threads:
            thread.join(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
