"""Many tiny chunks: time and peak RSS of ``kensho verify --full`` and ``kensho sync``.

Issue 11, item 4: a manifest of 640,000 one-byte chunks (62.8 MiB, inside the old
limits) took 95-102 s and 3.9 GiB to verify 640 KB, and a sync did not finish. This
script builds, for each chunk count, one file of ``count x chunk-size`` random bytes
and a manifest cutting it into chunks of ``chunk-size`` bytes, then runs the real CLI
in a subprocess (as a user would) and reads its peak RSS from ``wait4``:

- ``parse``: ``load_manifest`` alone, interpreter start included (a refusal by the
  limits shows the field it names);
- ``verify --full``: every chunk re-hashed, the store already good;
- ``sync``: an empty store filled from a mirror folder holding the file.

    PYTHONPATH=src .venv/bin/python bench/tiny_chunks_bench.py [--counts 20000 80000]
        [--chunk-size 1] [--timeout 600]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _table import machine_line, markdown_table

ENTRY = "from kensho.cli import main; main()"
PARSE = "import sys; from pathlib import Path; from kensho.storage import load_manifest; " + (
    "load_manifest(Path(sys.argv[1]))"
)


@dataclass(frozen=True, slots=True)
class Run:
    """One subprocess: exit status, wall time, peak resident memory."""

    rc: int
    seconds: float
    peak_mib: float
    stderr: str

    def cell(self) -> str:
        if self.rc == -9:
            return f"> {self.seconds:.0f} s (killed), {self.peak_mib:.0f} MiB"
        status = "" if self.rc == 0 else f" (exit {self.rc})"
        return f"{self.seconds:.2f} s, {self.peak_mib:.0f} MiB{status}"


def run(args: list[str], timeout: float) -> Run:
    """Run ``python args...``; wall time, and the child's own peak RSS from ``wait4``."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "COLUMNS": "200"},
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        err.seek(0)
        tail = err.read().decode(errors="replace")[-300:]
    return Run(proc.returncode, seconds, usage.ru_maxrss / 1024, tail)  # KiB on Linux


def make_store(folder: Path, count: int, chunk_size: int) -> tuple[Path, Path]:
    """One data file of ``count`` chunks and its manifest; returns (data dir, manifest)."""
    data_dir = folder / "data"
    data_dir.mkdir()
    data = os.urandom(count * chunk_size)
    (data_dir / "tiny.bin").write_bytes(data)
    chunks = [
        {
            "offset": off,
            "size": chunk_size,
            "sha256": hashlib.sha256(data[off : off + chunk_size]).hexdigest(),
        }
        for off in range(0, len(data), chunk_size)
    ]
    signed = {
        "schema": 1,
        "name": "tiny",
        "version": "1",
        "serial": 1,
        "created": "2026-11-25T10:00:00Z",
        "files": [
            {
                "path": "tiny.bin",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "chunks": chunks,
            }
        ],
    }
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"signed": signed, "signatures": []}, separators=(",", ":")))
    return data_dir, manifest


def measure(count: int, chunk_size: int, timeout: float) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="kensho-tiny-") as tmp:
        base = Path(tmp)
        data_dir, manifest = make_store(base, count, chunk_size)
        size_mib = manifest.stat().st_size / (1 << 20)
        parse = run(["-c", PARSE, str(manifest)], timeout)
        if parse.rc != 0:
            found = re.search(r"files\[\d+\]\.chunks[\w.\[\]]*", parse.stderr)
            field = found.group(0) if found else parse.stderr.strip()[-100:]
            refused = f"refused ({parse.seconds:.2f} s, {parse.peak_mib:.0f} MiB): {field}"
            return [f"{count:,}", f"{size_mib:.1f} MiB", refused, "", ""]
        verify = run(
            ["-c", ENTRY, "verify", "--full", "-m", str(manifest), "-r", str(data_dir)], timeout
        )
        store = base / "store"
        sync = run(
            ["-c", ENTRY, "sync", "-m", str(manifest), "-r", str(store), "-s", str(data_dir)],
            timeout,
        )
        return [f"{count:,}", f"{size_mib:.1f} MiB", parse.cell(), verify.cell(), sync.cell()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--chunk-size", type=int, default=1, help="bytes per chunk")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    args = parser.parse_args()
    rows = [measure(n, args.chunk_size, args.timeout) for n in sorted(args.counts)]
    print(f"\n{machine_line()}; chunks of {args.chunk_size} B, one file, mirror-folder source")
    print("each cell: wall time, peak RSS of that process\n")
    headers = ["chunks", "manifest", "parse", "verify --full", "sync (empty store)"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
