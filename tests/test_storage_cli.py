"""``kensho verify``, ``kensho sync`` and ``kensho manifest build`` as real processes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import pytest

from _server_support import clean_env, kensho_popen
from _storage_support import http_server, kensho, signed_for, write_tree

FILES = {"models/w.bin": os.urandom(300_000), "tok.json": b'{"vocab": 3}'}


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    write_tree(src, FILES)
    manifest = tmp_path / "manifest.json"
    done = kensho(
        "manifest",
        "build",
        src,
        "-o",
        manifest,
        "--chunk-size",
        "65536",
        "--name",
        "demo",
        "--serial",
        "4",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    return src, manifest


def test_build_then_sync_then_verify(tmp_path: Path) -> None:
    src, manifest = build(tmp_path)
    doc = json.loads(manifest.read_text())
    assert doc["signed"]["serial"] == 4 and len(doc["signed"]["files"]) == 2
    root = tmp_path / "store"
    synced = kensho("sync", "-m", manifest, "-r", root, "-s", src, cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    assert "models/w.bin" in synced.stdout and "ok" in synced.stdout
    checked = kensho("verify", "-m", manifest, "-r", root, "--json", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    events = json_lines(checked.stdout)
    assert events[0]["kind"] == "storage.verify.started"
    assert events[-1]["kind"] == "storage.verify.finished" and events[-1]["ok"] is True


def test_the_runner_keeps_outside_kensho_variables_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown KENSHO_* variable stops every command; the one test runner drops
    the ones of the process running the tests, so they cannot decide a test."""
    _, manifest = build(tmp_path)
    monkeypatch.setenv("KENSHO_NOT_A_SETTING", "1")
    checked = kensho("verify", "-m", manifest, "-r", tmp_path / "store", "--json", cwd=tmp_path)
    assert checked.returncode == 1, checked.stderr  # a verify verdict, not a config error
    assert json_lines(checked.stdout)[-1]["kind"] == "storage.verify.finished"


def test_verify_exits_1_on_a_corrupt_file(tmp_path: Path) -> None:
    _, manifest = build(tmp_path)
    root = tmp_path / "store"
    write_tree(root, FILES)
    data = bytearray(FILES["models/w.bin"])
    data[70_000] ^= 1
    (root / "models/w.bin").write_bytes(data)
    done = kensho("verify", "-m", manifest, "-r", root, "--full", cwd=tmp_path)
    assert done.returncode == 1
    assert "corrupt" in done.stdout and "bad chunks: 1" in done.stdout


def test_sync_json_lines_and_missing_source_exit_4(tmp_path: Path) -> None:
    _, manifest = build(tmp_path)
    root = tmp_path / "store"
    done = kensho(
        "sync", "-m", manifest, "-r", root, "-s", tmp_path / "nowhere", "--json", cwd=tmp_path
    )
    assert done.returncode == 4, done.stderr
    kinds = [e["kind"] for e in json_lines(done.stdout)]
    assert "storage.source.failed" in kinds and "storage.repair.failed" in kinds
    assert "tok.json" in done.stderr and "could not be made good" in done.stderr


def test_hostile_manifest_names_the_field(tmp_path: Path) -> None:
    _, manifest = build(tmp_path)
    doc = json.loads(manifest.read_text())
    doc["signed"]["files"][1]["path"] = "../../etc/passwd"
    manifest.write_text(json.dumps(doc))
    done = kensho("verify", "-m", manifest, "-r", tmp_path / "store", cwd=tmp_path)
    assert done.returncode == 10
    assert "files[1].path" in done.stderr


def test_help_documents_exit_codes(tmp_path: Path) -> None:
    for command in ("verify", "sync"):
        done = kensho(command, "--help", cwd=tmp_path)
        assert done.returncode == 0
        assert "Exit codes" in done.stdout


def test_two_syncs_at_once(tmp_path: Path) -> None:
    """One sync holds the lock; --no-wait exits 7; a waiting one says so, then succeeds."""
    _, manifest = build(tmp_path)
    root = tmp_path / "store"
    args = ["sync", "-m", str(manifest), "-r", str(root), "--json"]
    with (
        http_server(FILES, pause_after=100_000) as (url, state),
        kensho_popen(
            *args, "-s", url, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as first,
    ):
        assert state.paused.wait(30), "the first sync never started downloading"
        busy = kensho("sync", "-m", manifest, "-r", root, "-s", url, "--no-wait", cwd=tmp_path)
        assert busy.returncode == 7, busy.stderr
        assert "another Kensho process" in busy.stderr
        with kensho_popen(
            *args,
            "-s",
            url,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as second:
            assert second.stdout is not None
            for line in second.stdout:
                if json.loads(line)["kind"] == "storage.lock.waiting":
                    break
            state.resume.set()
            rest = second.stdout.read()
            assert second.wait(50) == 0
        assert first.wait(50) == 0
    # The second sync found everything repaired by the first: it fetched nothing.
    assert "storage.download.progress" not in rest
    for rel, data in FILES.items():
        assert (root / rel).read_bytes() == data


# Legal file names that are also rich markup: the first raised MarkupError, the
# second was drawn as styling (display spoofing).
MARKUP_FILES = {
    "w[/]z.bin": b"w" * 3000,
    "[green]ok[/green].bin": b"g" * 2000,
    "models/[bold]x[/bold].bin": b"x" * 1000,
}


def write_manifest(path: Path, files: dict[str, bytes], **extra: Any) -> Path:
    path.write_text(json.dumps({"signed": signed_for(files, 1024, **extra), "signatures": []}))
    return path


def test_file_names_that_look_like_markup_are_printed_literally(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, MARKUP_FILES)
    manifest = write_manifest(tmp_path / "m.json", MARKUP_FILES)
    root = tmp_path / "store"
    synced = kensho("sync", "-m", manifest, "-r", root, "-s", src, cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    checked = kensho("verify", "-m", manifest, "-r", root, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    for done in (synced, checked):
        for name in MARKUP_FILES:
            assert name in done.stdout
        assert "MarkupError" not in done.stderr


def test_update_plan_shows_versions_and_changelogs_literally(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, MARKUP_FILES)
    root = tmp_path / "store"
    v1 = write_manifest(tmp_path / "v1.json", MARKUP_FILES)
    assert kensho("sync", "-m", v1, "-r", root, "-s", src, cwd=tmp_path).returncode == 0
    changed = {**MARKUP_FILES, "w[/]z.bin": b"W" * 3000}
    signed = signed_for(changed, 1024, serial=2, version="2.0[/]")
    for entry in signed["files"]:
        entry["changelog"] = "[red]urgent[/red] fix"
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"signed": signed, "signatures": []}))
    done = kensho("sync", "-m", v2, "-r", root, "-s", src, "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "(2.0[/])" in done.stdout
    assert "[red]urgent[/red] fix" in done.stdout
    assert "w[/]z.bin" in done.stdout


def test_progress_bars_in_a_terminal_show_file_names_literally(tmp_path: Path) -> None:
    """In a terminal, each file gets a progress bar whose description holds its path."""
    src = tmp_path / "src"
    write_tree(src, MARKUP_FILES)
    manifest = write_manifest(tmp_path / "m.json", MARKUP_FILES)
    controller, terminal = pty.openpty()
    env = clean_env(COLUMNS="200", TERM="xterm")
    args = ["sync", "-m", str(manifest), "-r", str(tmp_path / "s"), "-s", str(src)]
    with kensho_popen(
        *args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=terminal, env=env
    ) as process:
        os.close(terminal)
        screen = read_until_closed(controller)
        stdout = process.stdout.read() if process.stdout else b""
        assert process.wait(50) == 0, screen.decode(errors="replace")
    assert b"MarkupError" not in screen
    assert b"fetch w[/]z.bin" in screen
    assert "[green]ok[/green].bin" in stdout.decode()


def read_until_closed(fd: int) -> bytes:
    """Everything written to a pseudo-terminal until its last writer closes it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)
