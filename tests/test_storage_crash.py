"""A real ``kensho sync`` killed with SIGKILL at chosen moments, then run again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from _server_support import kensho_popen
from _storage_support import http_server, kensho, manifest_for, signed_for, write_tree
from kensho.storage import StorageManager, dump_manifest, parse_manifest
from kensho.storage._assemble import part_path

CHUNK = 64 * 1024
FILES = {"models/w.bin": os.urandom(64 * CHUNK), "tok.json": b'{"vocab": 3}'}


def test_sigkill_mid_download_then_resume(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(dump_manifest(manifest_for(FILES, CHUNK)))
    root = tmp_path / "store"
    size = len(FILES["models/w.bin"])
    args = ["sync", "-m", str(manifest), "-r", str(root), "--json"]
    with http_server(FILES, pause_after=size // 2) as (url, state):
        with kensho_popen(
            *args,
            "-s",
            url,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                event = json.loads(line)
                if (
                    event["kind"] == "storage.download.progress"
                    and event["path"] == "models/w.bin"
                    and event["done"] >= 8 * CHUNK
                ):
                    break
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        # Nothing half-written at a final path; the partial data waits in .kensho/tmp.
        final = root / "models/w.bin"
        assert not final.exists() or final.read_bytes() == FILES["models/w.bin"]
        # The big file's partial data waits in .kensho/tmp (tok.json may be there too:
        # the server pauses every response once half the big file went out).
        entry = manifest_for(FILES, CHUNK).file("models/w.bin")
        assert entry is not None
        assert part_path(root / ".kensho" / "tmp", entry).is_file()
        state.resume.set()
        first_requests = len(state.requests)
        again = kensho(*args, "-s", url, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        resumed = [r for r in state.requests[first_requests:] if r[0] == "models/w.bin"]
    assert final.read_bytes() == FILES["models/w.bin"]
    assert len(resumed) == 1
    start = int(resumed[0][1].removeprefix("bytes=").split("-")[0])
    assert start >= 8 * CHUNK, "the rerun fetched chunks that were already verified"
    assert start % CHUNK == 0
    assert list((root / ".kensho" / "tmp").glob("*.part")) == []


# --- killed between a file's swap and its record -----------------------------------------


@contextmanager
def records_blocked(root: Path) -> Iterator[None]:
    """Hold the store's SQLite write lock: a ``kensho`` keeping a record waits there.

    Readers are not blocked (WAL), so the update plans and swaps; it stops at the
    first record it keeps, right after a swap, until this lock is released or it
    is killed. That is the deterministic moment "swapped, not yet recorded".
    """
    db = sqlite3.connect(root / ".kensho" / "state.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.close()


def kill_after_swap(args: Sequence[str], root: Path, path: str, cwd: Path) -> None:
    """Run ``kensho`` (``args``, with ``--json``); SIGKILL it once ``path`` is swapped in."""
    with (
        records_blocked(root),
        kensho_popen(
            *args,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event["kind"] == "storage.file.updated" and event["path"] == path:
                break
        else:
            raise AssertionError(f"kensho ended before swapping {path}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL


def install(tmp_path: Path, old: dict[str, bytes], new: dict[str, bytes]) -> tuple[Path, Path]:
    """A store synced to ``old`` (serial 1); returns (root, the serial-2 manifest of ``new``)."""
    signed = signed_for(new, CHUNK, serial=2)
    (tmp_path / "v2.json").write_bytes(
        dump_manifest(parse_manifest({"signed": signed, "signatures": []}))
    )
    root = tmp_path / "store"
    write_tree(root, old)

    async def trust_v1() -> None:
        async with StorageManager(root, manifest_for(old, CHUNK)) as manager:
            async for _ in manager.initialize_and_verify():
                pass

    asyncio.run(trust_v1())
    return root, tmp_path / "v2.json"


def trusted_serial(root: Path) -> int:
    return int(
        json.loads((root / ".kensho/trusted-manifest.json").read_bytes())["signed"]["serial"]
    )


def test_sigkill_between_swap_and_record_does_not_fetch_the_file_again(tmp_path: Path) -> None:
    old = {"models/w.bin": os.urandom(24 * CHUNK)}
    new = {"models/w.bin": os.urandom(24 * CHUNK)}
    root, v2 = install(tmp_path, old, new)
    sync = ["sync", "-m", str(v2), "-r", str(root), "--json"]
    with http_server(new) as (url, served):
        kill_after_swap([*sync, "-s", url], root, "models/w.bin", tmp_path)
        # Swapped, not recorded, the update journaled but unfinished.
        assert (root / "models/w.bin").read_bytes() == new["models/w.bin"]
        assert trusted_serial(root) == 1
        assert (root / ".kensho/pending-manifest.json").is_file()
        before = len(served.requests)
        again = kensho(*sync, "-s", url, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        refetched = served.requests[before:]
    assert refetched == [], "the rerun fetched a file already in place"
    assert trusted_serial(root) == 2
    assert not (root / ".kensho/pending-manifest.json").exists()
    finished = [json.loads(line) for line in again.stdout.splitlines()][-1]
    assert finished["kind"] == "storage.update.finished" and finished["fetched"] == 0
    full = kensho("verify", "-r", root, "--full", cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr


def test_journal_of_an_update_that_can_no_longer_be_placed_is_not_replayed(
    tmp_path: Path,
) -> None:
    """Killed among its swaps, then a file appears where the update needs a folder."""
    old = {"a.bin": os.urandom(4 * CHUNK)}
    new = {"a.bin": os.urandom(4 * CHUNK), "extra/b.bin": os.urandom(4 * CHUNK)}
    root, v2 = install(tmp_path, old, new)
    sync = ["sync", "-r", str(root), "--json"]
    with http_server(new) as (url, _):
        kill_after_swap([*sync, "-m", str(v2), "-s", url], root, "a.bin", tmp_path)
        assert (root / ".kensho/pending-manifest.json").is_file()
        (root / "extra").write_bytes(b"the user's own file")
        replay = kensho(*sync, "-s", url, cwd=tmp_path)  # no manifest: finish the journal
        assert replay.returncode == 4
        assert "extra" in replay.stderr and "is a file where a folder is needed" in replay.stderr
        assert not (root / ".kensho/pending-manifest.json").exists()
        assert (root / "extra").read_bytes() == b"the user's own file"
        assert trusted_serial(root) == 1
        # Moving the file away and naming the release again finishes the update.
        (root / "extra").rename(tmp_path / "kept")
        done = kensho(*sync, "-m", str(v2), "-s", url, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert all((root / rel).read_bytes() == data for rel, data in new.items())
    assert trusted_serial(root) == 2
