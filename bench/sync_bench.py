"""Sync benchmark: Kensho vs ``curl`` + fsync, from the same local HTTP server, same run.

Two data sets, generated in one temp folder (``--dir``, default the system temp dir;
keep it on a real disk, not a tmpfs):

- one large file (``--large-mib``, default 512 MiB);
- the mixed set of ``bench/verify_bench.py``: 3 large files and 512 files of 1 MiB
  (about 2 GB at ``--mixed-scale 1``).

Each contender writes every byte durably: Kensho syncs an empty store
(``StorageManager.initialize_and_verify``: Range requests, every chunk hashed, the
whole file's SHA-256 checked, fsync, ``os.replace``, fsync of the folder); ``curl``
downloads the same files over one connection, then each file and its folder is
fsynced (``curl -o FILE && sync FILE``). Runs are interleaved (Kensho, curl, Kensho,
curl, ...) so a change of machine load hits both; before each run the previous copy
is deleted and dirty pages are flushed, untimed. Kensho runs in-process: the
``kensho`` CLI's start-up (imports) is measured on its own line.

    .venv/bin/python bench/sync_bench.py [--runs 3] [--large-mib 512] [--mixed-scale 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kensho.storage import HttpSource, Manifest, StorageManager, build_manifest
from kensho.telemetry import configure_logging
from verify_bench import MiB, all_files, fresh, fsync_all, make_files, serve

TARGET = 0.95


async def kensho_sync(root: Path, manifest: Manifest, url: str) -> None:
    async with StorageManager(root, manifest, [HttpSource(url)]) as manager:
        async for _ in manager.initialize_and_verify():
            pass
        assert manager.report is not None and manager.report.ok


def curl_durable(urls: list[str], out: Path) -> None:
    """``curl -o FILE`` for every URL (one process, one connection), then fsync all."""
    args = ["curl", "-sSf"]
    for i, url in enumerate(urls):
        args += ["-o", str(out / f"f{i}"), url]
    subprocess.run(args, check=True)
    fsync_all(out)


def timed(func: Callable[[], object], setup: Callable[[], object]) -> float:
    setup()
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def interleaved(
    contenders: dict[str, tuple[Callable[[], object], Callable[[], object]]], runs: int
) -> dict[str, list[float]]:
    """Times of each contender, run in turn ``runs`` times after one untimed warm-up each."""
    for func, setup in contenders.values():
        timed(func, setup)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, (func, setup) in contenders.items():
            times[name].append(timed(func, setup))
    return times


def measure(
    base: Path, data: Path, label: str, runs: int
) -> tuple[str, int, dict[str, list[float]]]:
    manifest = asyncio.run(build_manifest(data, name="bench", version="1"))
    nbytes = sum(f.size for f in manifest.files)
    server, thread = serve(data)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        urls = [url + f.path for f in manifest.files]
        store, out = base / "store", base / "curl"
        times = interleaved(
            {
                "kensho": (
                    lambda: asyncio.run(kensho_sync(store, manifest, url)),
                    lambda: fresh(store, make=False),
                ),
                "curl": (lambda: curl_durable(urls, out), lambda: fresh(out, make=True)),
            },
            runs,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        fresh(base / "store", make=False)
        fresh(base / "curl", make=False)
    return f"{label}, {len(manifest.files)} file(s)", nbytes, times


def cli_startup(runs: int) -> float:
    args = [sys.executable, "-m", "kensho", "--help"]
    times = [timed(lambda: subprocess.run(args, check=True, capture_output=True), lambda: None)]
    times += [
        timed(lambda: subprocess.run(args, check=True, capture_output=True), lambda: None)
        for _ in range(runs)
    ]
    return statistics.median(times[1:])


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large-mib", type=int, default=512)
    parser.add_argument("--mixed-scale", type=float, default=1.0, help="0 skips the mixed set")
    parser.add_argument("--dir", type=Path, default=None, help="where the temp folder goes")
    args = parser.parse_args()
    configure_logging(level="warning")
    results = []
    with tempfile.TemporaryDirectory(prefix="kensho-sync-bench-", dir=args.dir) as tmp:
        base = Path(tmp)
        one = base / "one"
        make_files(one, 1, args.large_mib * MiB, 0, 0)
        results.append(measure(base, one, f"one file of {args.large_mib} MiB", args.runs))
        fresh(one, make=False)
        if args.mixed_scale > 0:
            mixed = base / "mixed"
            large = int(512 * MiB * args.mixed_scale)
            small = int(512 * args.mixed_scale)
            make_files(mixed, 3, large, small, MiB)
            label = f"mixed set (3 x {large // MiB} MiB + {small} x 1 MiB)"
            results.append(measure(base, mixed, label, args.runs))
            assert len(all_files(mixed)) == 3 + small
    startup = cli_startup(args.runs)

    print(f"\nKensho sync vs curl + fsync: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"medians of {args.runs} interleaved runs (min-max in brackets)\n")
    print("| data | curl + fsync | Kensho sync | Kensho / curl speed | target |")
    print("|---|---|---|---|---|")
    for label, nbytes, times in results:
        t_curl, t_kensho = statistics.median(times["curl"]), statistics.median(times["kensho"])
        ratio = t_curl / t_kensho
        verdict = "met" if ratio >= TARGET else "**not met**"
        print(
            f"| {label}, {nbytes / 1e9:.2f} GB "
            f"| {t_curl:.2f} s ({spread(times['curl'])}), {nbytes / t_curl / 1e9:.2f} GB/s "
            f"| {t_kensho:.2f} s ({spread(times['kensho'])}), {nbytes / t_kensho / 1e9:.2f} GB/s "
            f"| {ratio:.2f}x | >= {TARGET}x: {verdict} |"
        )
    print(f"\n`kensho --help` start-up (imports), not in the times above: {startup:.2f} s")


if __name__ == "__main__":
    main()
