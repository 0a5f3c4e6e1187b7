"""A real ``kensho sync`` killed with SIGKILL mid-download, then run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from _storage_support import ENTRY, http_server, kensho, manifest_for
from kensho.storage import dump_manifest
from kensho.storage._repair import part_path

CHUNK = 64 * 1024
FILES = {"models/w.bin": os.urandom(64 * CHUNK), "tok.json": b'{"vocab": 3}'}


def test_sigkill_mid_download_then_resume(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(dump_manifest(manifest_for(FILES, CHUNK)))
    root = tmp_path / "store"
    size = len(FILES["models/w.bin"])
    args = [sys.executable, "-c", ENTRY, "sync", "-m", str(manifest), "-r", str(root), "--json"]
    with http_server(FILES, pause_after=size // 2) as (url, state):
        with subprocess.Popen(
            [*args, "-s", url],
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
        again = kensho(*args[3:], "-s", url, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        resumed = [r for r in state.requests[first_requests:] if r[0] == "models/w.bin"]
    assert final.read_bytes() == FILES["models/w.bin"]
    assert len(resumed) == 1
    start = int(resumed[0][1].removeprefix("bytes=").split("-")[0])
    assert start >= 8 * CHUNK, "the rerun fetched chunks that were already verified"
    assert start % CHUNK == 0
    assert list((root / ".kensho" / "tmp").glob("*.part")) == []
