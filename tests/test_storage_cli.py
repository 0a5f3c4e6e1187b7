"""``kensho verify``, ``kensho sync`` and ``kensho manifest build`` as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _storage_support import ENTRY, http_server, kensho, write_tree

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
    args = [sys.executable, "-c", ENTRY, "sync", "-m", str(manifest), "-r", str(root), "--json"]
    with (
        http_server(FILES, pause_after=100_000) as (url, state),
        subprocess.Popen(
            [*args, "-s", url], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as first,
    ):
        assert state.paused.wait(30), "the first sync never started downloading"
        busy = kensho("sync", "-m", manifest, "-r", root, "-s", url, "--no-wait", cwd=tmp_path)
        assert busy.returncode == 7, busy.stderr
        assert "another Kensho process" in busy.stderr
        with subprocess.Popen(
            [*args, "-s", url],
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
