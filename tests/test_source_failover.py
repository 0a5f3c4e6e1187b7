"""``kensho sync`` against a bad first mirror and a good second one, all real.

Real HTTP servers on 127.0.0.1, a real ``kensho`` process, settings through
``KENSHO_STORAGE_SOURCE_*``: a mirror that trickles, one that asks to be left alone,
one that never answers. Each must cost the run once, not once per file, and the
sync must finish from the good mirror.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _server_support import kensho_env, run_kensho
from _storage_support import http_server, signed_for

FILES = {f"models/part{i}.bin": os.urandom(100_000) for i in range(4)}


def write_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"signed": signed_for(FILES, 16_384), "signatures": []}))
    return path


def sync(tmp_path: Path, *sources: str, json_lines: bool = False, **settings: str) -> Any:
    manifest = write_manifest(tmp_path)
    args = ["sync", "-m", str(manifest), "-r", str(tmp_path / "store")]
    for url in sources:
        args += ["-s", url]
    if json_lines:
        args.append("--json")
    env = kensho_env(tmp_path / "data", port=None, COLUMNS="2000", **settings)
    return run_kensho(*args, env=env, cwd=tmp_path, timeout=50)


def failures(stdout: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e for e in events if e["kind"] == "storage.source.failed"]


def assert_store_is_good(tmp_path: Path) -> None:
    for rel, data in FILES.items():
        assert (tmp_path / "store" / rel).read_bytes() == data, rel


@dataclass
class TrickleState:
    interval: float  # seconds between two body bytes
    requests: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _TrickleHandler(BaseHTTPRequestHandler):
    """Answers at once with the right headers, then sends one byte per interval."""

    server: _TrickleServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        st = self.server.state
        with st.lock:
            st.requests += 1
        data = FILES[self.path.lstrip("/")]
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        start, end = (int(m.group(1)), int(m.group(2)) + 1) if m else (0, len(data))
        self.send_response(206 if m else 200)
        self.send_header("Content-Length", str(end - start))
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        for i in range(start, end):
            if st.stopping.wait(st.interval):
                return
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up on us: that is the point
                return


class _TrickleServer(ThreadingHTTPServer):
    daemon_threads = True
    state: TrickleState


@contextmanager
def trickle_server(interval: float) -> Iterator[tuple[str, TrickleState]]:
    server = _TrickleServer(("127.0.0.1", 0), _TrickleHandler)
    server.state = TrickleState(interval)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server.state
    finally:
        server.state.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_sync_abandons_a_trickling_mirror_and_finishes_from_the_next(tmp_path: Path) -> None:
    """20 bytes/s would take 5.6 hours for these 400 KB; the floor is 1000 bytes/s."""
    with trickle_server(0.05) as (slow, slow_state), http_server(FILES) as (good, good_state):
        done = sync(
            tmp_path,
            slow,
            good,
            KENSHO_STORAGE_SOURCE_MIN_RATE="1000",
            KENSHO_STORAGE_SOURCE_RATE_WINDOW="0.5",
        )
    assert done.returncode == 0, done.stderr
    assert_store_is_good(tmp_path)
    said = done.stderr
    assert f"{slow} could not deliver" in said
    assert "below the minimum of 1000 bytes/s" in said
    assert "abandoned for the rest of this run" in said
    assert f"trying {good}" in said
    # At most the files fetched at the same time found out for themselves.
    assert 1 <= slow_state.requests <= 2
    assert good_state.bytes_served == sum(map(len, FILES.values()))


def test_a_mirror_asking_to_be_left_alone_is_asked_once(tmp_path: Path) -> None:
    with (
        http_server(FILES, fail_first=1_000_000, retry_after="99999") as (busy, busy_state),
        http_server(FILES) as (good, _),
    ):
        done = sync(tmp_path, busy, good, json_lines=True)
    assert done.returncode == 0, done.stderr
    assert_store_is_good(tmp_path)
    assert len(busy_state.requests) == 1
    failed = failures(done.stdout)
    assert {e["path"] for e in failed} == set(FILES)  # every file says why it skipped
    assert all(e["source"] == busy and e["next_source"] == good for e in failed)
    asked = [e for e in failed if not e["error"].startswith("skipped, not asked again")]
    assert len(asked) == 1
    assert "left alone for 99999 s (Retry-After)" in asked[0]["error"]
    assert "abandoned for the rest of this run" in asked[0]["error"]
    assert all("left alone for 99999 s" in e["error"] for e in failed)  # skips say why


def test_a_mirror_that_never_answers_times_out_once(tmp_path: Path) -> None:
    with (
        http_server(FILES, hang=True) as (silent, silent_state),
        http_server(FILES) as (good, _),
    ):
        done = sync(
            tmp_path,
            silent,
            good,
            json_lines=True,
            KENSHO_STORAGE_SOURCE_TIMEOUT="0.3",
            KENSHO_STORAGE_SOURCE_RETRIES="0",
        )
    assert done.returncode == 0, done.stderr
    assert_store_is_good(tmp_path)
    assert len(silent_state.requests) == 1
    failed = failures(done.stdout)
    assert {e["path"] for e in failed} == set(FILES)
    assert sum("stopped sending data" in e["error"] for e in failed) == len(FILES)
    assert sum("skipped, not asked again" in e["error"] for e in failed) == len(FILES) - 1
