"""``kensho status`` and the status stream's decoder.

The view is driven through a real pseudo-terminal against a real ``kensho up``
subprocess: what a person at the terminal would read after a breaker was forced open
and while the queue is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
from rich.console import Console

from _http_support import server_metric, sse_events
from _server_support import kensho_env, kensho_up, run_kensho
from kensho.cli._serve_cmds import StatusView, _server_url
from kensho.events import (
    BreakerStateChanged,
    IntegritySnapshot,
    QueueSnapshot,
    ReleaseSnapshot,
    StatusSnapshot,
    StorageFileRepaired,
    TrafficSnapshot,
    UnknownEvent,
    decode_event,
    event_types,
)

MOCK_ENV = {
    "KENSHO_MODEL_ENGINE": "mock",
    "KENSHO_MODEL_ID": "mock",
    "KENSHO_MODEL_MOCK_TIME_TO_FIRST_TOKEN": "0.05",
    "KENSHO_MODEL_MOCK_TIME_PER_TOKEN": "0.05",
    "KENSHO_RUNTIME_MAX_QUEUE_SIZE": "3",
    "KENSHO_RUNTIME_CONCURRENCY": "gpu=1,cpu=1",
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """A command on a real pseudo-terminal (200 columns); its screen output as text."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
        env = {**env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "60"}
        env.pop("KENSHO_LOG_FORMAT", None)  # what a person gets: the terminal default
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kensho", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.master = master
        self.text = ""
        self.raw = ""

    def read_until(self, pattern: str, timeout: float = 30.0) -> str:
        """Read the terminal until ``pattern`` (a regex) appears in what came after the
        last call; return that new text."""
        start = len(self.text)
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text[start:]):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no {pattern!r} on the terminal:\n{self.text[start:]}")
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the command ended: EIO on the closed pty
                chunk = b""
            if not chunk:
                raise AssertionError(f"kensho status ended before {pattern!r}:\n{self.text}")
            decoded = chunk.decode("utf-8", "replace")
            self.raw += decoded
            self.text += _ANSI.sub("", decoded)
        return self.text[start:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)
        os.close(self.master)


def _fill_queue(url: str, requests: int, full: threading.Event, done: threading.Event) -> None:
    """Send ``requests`` long completions at once; set ``full`` at the first 429 (the
    queue is full then); hold the rest open until ``done``."""

    async def run() -> None:
        body = {"model": "mock", "prompt": "x", "max_tokens": 400}
        limits = httpx.Limits(max_connections=requests)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            pending = {asyncio.ensure_future(client.post("/v1/completions", json=body))
                       for _ in range(requests)}  # fmt: skip
            while pending and not full.is_set():
                finished, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                if any(t.result().status_code == 429 for t in finished):
                    full.set()
            await asyncio.to_thread(done.wait, 60)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(run())


def test_status_on_a_terminal_follows_a_forced_open_breaker_and_a_full_queue(
    tmp_path: Path,
) -> None:
    with kensho_up(env=kensho_env(tmp_path, **MOCK_ENV), cwd=tmp_path) as server:
        port = server.url.rsplit(":", 1)[1]
        # No --url: the port comes from KENSHO_SERVER_PORT, as for any other command.
        term = Terminal(["status"], kensho_env(tmp_path, port=port), tmp_path)
        try:
            first = term.read_until(r"breaker gpu\s*│\s*closed")
            assert re.search(r"queue\s*│\s*0 waiting of 3 \(critical 0", first)
            assert "integrity" in first
            forced = httpx.post(
                server.url + "/v1/kensho/breaker",
                json={"action": "force_open", "engine": "primary"},
            )
            assert forced.status_code == 200
            after = term.read_until(r"breaker gpu\s*│\s*forced_open since")
            assert "forced open through the admin API" in after
            assert "None" not in after

            full, done = threading.Event(), threading.Event()
            load = threading.Thread(target=_fill_queue, args=(server.url, 8, full, done))
            load.start()
            try:
                assert full.wait(30), "the queue never filled"
                capacity = int(server_metric(server.url, "kensho_queue_capacity"))
                term.read_until(
                    rf"queue\s*│\s*{capacity} waiting of {capacity} \(critical 0 · high 0 · "
                    rf"normal {capacity} · low 0\); running cpu 1"
                )
                term.read_until(r"tasks\s*│\s*completed 0 .*rejected [1-9]")
            finally:
                done.set()
                load.join(30)
            assert "HTTP Request" not in term.text  # no httpx log line above the table
        finally:
            term.close()


def test_status_once_with_the_api_key_from_the_settings(tmp_path: Path) -> None:
    key = "k-status-1234"
    env = kensho_env(tmp_path, **MOCK_ENV, KENSHO_API_KEY=key)
    with kensho_up(env=env, cwd=tmp_path) as server:
        port = server.url.rsplit(":", 1)[1]
        keyed = run_kensho("status", "--once", env=kensho_env(tmp_path, port=port,
                           KENSHO_API_KEY=key), cwd=tmp_path)  # fmt: skip
        keyless = run_kensho("status", "--once", env=kensho_env(tmp_path, port=port), cwd=tmp_path)
        as_json = run_kensho("status", "--once", "--json", "--url", server.url, "--api-key", key,
                             env=kensho_env(tmp_path), cwd=tmp_path)  # fmt: skip
    assert keyed.returncode == 0, keyed.stderr
    assert "breaker gpu" in keyed.stdout
    assert "HTTP Request" not in keyed.stderr + keyed.stdout
    assert as_json.returncode == 0, as_json.stderr
    [line] = as_json.stdout.splitlines()  # one JSON line: the snapshot
    snap = decode_event("snapshot", orjson.loads(line))
    assert isinstance(snap, StatusSnapshot)
    assert snap.model == "mock"
    assert keyless.returncode == 1
    assert "refused: HTTP 401" in keyless.stderr
    assert "--api-key or set KENSHO_API_KEY" in keyless.stderr
    assert "Traceback" not in keyless.stderr


def test_server_url_of_a_wildcard_bind_is_this_machine() -> None:
    assert _server_url("0.0.0.0", 9000) == "http://127.0.0.1:9000"
    assert _server_url("::1", 9000) == "http://[::1]:9000"
    assert _server_url("box.local", 80) == "http://box.local:80"


# -- the decoder ------------------------------------------------------------------------


def test_every_event_kind_round_trips_through_the_decoder() -> None:
    change = BreakerStateChanged(
        breaker="gpu", from_state="closed", to_state="open", reason="3 failures", open_for=5.0
    )
    assert decode_event(change.kind, change.to_dict()) == change
    repaired = StorageFileRepaired(path="a.bin", fetched=1, reused=2, sources=("usb",))
    assert decode_event(repaired.kind, repaired.to_dict()) == repaired
    assert {"breaker.state_changed", "snapshot", "shutdown", "storage.ready"} <= set(event_types())


def test_a_renamed_field_is_a_decoding_error_that_names_it() -> None:
    data = BreakerStateChanged(
        breaker="gpu", from_state="closed", to_state="open", reason="x"
    ).to_dict()
    data["to"] = data.pop("to_state")  # what the old view read
    with pytest.raises(ValueError, match=r"'breaker.state_changed': to_state: Field required"):
        decode_event("breaker.state_changed", data)


def test_a_mistyped_field_is_a_decoding_error() -> None:
    with pytest.raises(ValueError, match="open_for"):
        decode_event(
            "breaker.state_changed",
            {"breaker": "gpu", "from_state": "a", "to_state": "b", "reason": "r",
             "open_for": "soon"},
        )  # fmt: skip


def test_an_unknown_kind_keeps_its_message() -> None:
    event = decode_event("runtime.new_thing", {"message": "something new"})
    assert isinstance(event, UnknownEvent)
    assert event.message == "something new"


def test_the_server_snapshot_decodes_to_the_typed_snapshot(tmp_path: Path) -> None:
    with (
        kensho_up(env=kensho_env(tmp_path, **MOCK_ENV), cwd=tmp_path) as server,
        httpx.stream("GET", server.url + "/v1/kensho/status", timeout=30) as stream,
    ):
        lines = stream.iter_lines()
        assert next(lines) == "event: snapshot"
        data = next(lines).removeprefix("data: ")
    snap = decode_event("snapshot", orjson.loads(data))
    assert isinstance(snap, StatusSnapshot)
    assert [b.name for b in snap.breakers] == ["gpu", "cpu"]
    assert snap.queue.capacity == 3
    assert snap.integrity.status == "ok"
    assert dataclasses.asdict(snap.traffic) == {
        "tokens": 0.0, "completions": 0, "latency_seconds": 0.0,
    }  # fmt: skip


def test_view_draws_server_data_literally() -> None:
    view = StatusView()
    view.update(UnknownEvent(name="x", text="repaired w[/]z[red]x[/red].bin"))
    console = Console(record=True, width=200)
    console.print(view.render())
    assert "repaired w[/]z[red]x[/red].bin" in console.export_text()


def test_view_moves_a_breaker_on_its_event_and_keeps_the_reason() -> None:
    view = StatusView()
    view.update(
        BreakerStateChanged(breaker="gpu", from_state="closed", to_state="open", reason="boom")
    )
    rows = dict(view.rows())
    assert rows == {"event": rows["event"]}  # no snapshot yet: only the event line
    assert rows["event"].endswith("breaker gpu: closed -> open (boom)")


def _toggle_breaker(url: str, stop: threading.Event) -> None:
    """Force the fallback's breaker open and reset it, again and again: a steady flow."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            for action in ("force_open", "reset"):
                client.post("/v1/kensho/breaker", json={"action": action, "engine": "fallback"})


def test_snapshots_keep_coming_while_events_flow(tmp_path: Path) -> None:
    with kensho_up(env=kensho_env(tmp_path, **MOCK_ENV), cwd=tmp_path) as server:
        stop = threading.Event()
        toggler = threading.Thread(target=_toggle_breaker, args=(server.url, stop))
        snapshots: list[StatusSnapshot] = []
        between: list[float] = []  # event times after the first snapshot
        try:
            with httpx.stream("GET", server.url + "/v1/kensho/status", timeout=30) as stream:
                for kind, data in sse_events(stream.iter_lines()):
                    event = decode_event(kind, orjson.loads(data))
                    if isinstance(event, StatusSnapshot):
                        snapshots.append(event)
                        if len(snapshots) == 1:
                            toggler.start()
                        elif len(between) >= 5:
                            break
                    elif snapshots and isinstance(event, BreakerStateChanged):
                        between.append(event.ts)
        finally:
            stop.set()
            if toggler.is_alive():
                toggler.join(30)
    assert len(snapshots) >= 2
    assert len(between) >= 5  # the stream was busy, and still sent the state


def test_view_shows_the_release_served_staged_and_last_checked() -> None:
    base = dict(
        model="m", engines=("gpu",), active_engine="gpu", degraded=False, overloaded=False,
        draining=False, breakers=(), tasks={},
        queue=QueueSnapshot(depth={}, capacity=1, max_queue_size=1, in_flight={}),
        traffic=TrafficSnapshot(tokens=0.0, completions=0, latency_seconds=0.0),
        integrity=IntegritySnapshot(status="ok", files={}, problems={}, offline=False,
                                    checked_at=None),
    )  # fmt: skip
    release = ReleaseSnapshot(
        current_serial=1, staged_serial=2, staged_done=1024, staged_total=4096,
        last_check_at=0.0, last_check_result="new",
    )  # fmt: skip
    snap = StatusSnapshot(**base, release=release)
    assert decode_event("snapshot", snap.to_dict()) == snap
    view = StatusView()
    view.update(snap)
    line = dict(view.rows())["release"]
    assert line.startswith("serial 1 · staging 2: 1.0 KiB of 4.0 KiB · checked ")
    assert line.endswith("(new)")
