"""Over-the-air release benchmark: bytes a background prefetch fetches, and time from
publish to applied.

One file of 64 MiB (random bytes), default chunking (content-defined, avg 1 MiB). Two
new releases: 1 MiB changed in place, and 100 bytes inserted in the middle (every later
byte shifts). For each, a store on the old release polls a local HTTP origin (counting
every body byte) that publishes the new ``manifest.json``, stages it
(:class:`~kensho.storage.updates.ReleaseUpdater`) and applies it offline
(:func:`~kensho.storage.prefetch.apply_staged`).

Target (issue 15): bytes fetched <= changed bytes + 2 chunks + the manifest.

    .venv/bin/python bench/release_bench.py [--size-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from _table import machine_line, markdown_table
from delta_bench import serve
from kensho.storage import HttpSource, StorageManager, build_manifest, dump_manifest
from kensho.storage.prefetch import apply_staged
from kensho.storage.updates import ReleaseUpdater
from kensho.telemetry import configure_logging

MiB = 1024 * 1024


def _write(folder: Path, name: str, data: bytes) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return len(data)


async def _install(root: Path, data: bytes) -> None:
    await asyncio.to_thread(_write, root, "model.bin", data)
    manifest = await build_manifest(root, name="bench", version="1", serial=1)
    async with StorageManager(root, manifest) as manager:
        async for _ in manager.initialize_and_verify():
            pass


async def _case(work: Path, name: str, old: bytes, new: bytes, changed: int) -> list[object]:
    root, origin = work / f"{name}-store", work / f"{name}-origin"
    await _install(root, old)
    await asyncio.to_thread(_write, origin, "model.bin", new)
    manifest = await build_manifest(origin, name="bench", version="2", serial=2)
    manifest_size = await asyncio.to_thread(
        _write, origin, "manifest.json", dump_manifest(manifest)
    )
    chunks = manifest.files[0].chunks
    mean = sum(c.size for c in chunks) / len(chunks)
    with serve(origin) as (url, server):
        async with StorageManager(root, None, [HttpSource(url)]) as manager:
            started = time.perf_counter()
            updater = ReleaseUpdater(manager, interval=60, emit=lambda _: None)
            result = await updater.check_now()
            staged = time.perf_counter()
            assert result.result == "new", result
            await apply_staged(manager, how="boot", emit=lambda _: None)
            applied = time.perf_counter()
        fetched = server.bytes_served
    target = changed + 2 * mean + manifest_size
    await asyncio.to_thread(shutil.rmtree, root)
    return [
        name,
        f"{changed / MiB:.4f} MiB",
        f"{fetched / MiB:.2f} MiB",
        f"{target / MiB:.2f} MiB",
        "yes" if fetched <= target else "no",
        f"{staged - started:.2f} s",
        f"{applied - started:.2f} s",
    ]


async def main(size_mib: int) -> None:
    configure_logging(level="warning")
    old = os.urandom(size_mib * MiB)
    mid = len(old) // 2
    cases = {
        "1 MiB changed in place": (old[:mid] + os.urandom(MiB) + old[mid + MiB :], MiB),
        "100 bytes inserted": (old[:mid] + os.urandom(100) + old[mid:], 100),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (new, changed) in cases.items():
            rows.append(await _case(Path(tmp), name.split()[0], old, new, changed))
            rows[-1][0] = name
    print(machine_line())
    print(f"One file of {size_mib} MiB, CDC avg 1 MiB; HTTP origin on 127.0.0.1.\n")
    print(
        markdown_table(
            [
                "case",
                "changed",
                "fetched (incl. manifest)",
                "target",
                "within",
                "publish -> staged",
                "publish -> applied",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64)
    asyncio.run(main(parser.parse_args().size_mib))
