"""Fleet benchmark: 8 stores on 127.0.0.1 take the same new release; and S3 throughput.

**Fleet.** Eight stores hold release 1 (a model file, a tokenizer, a config). Release 2
changes a region of the model file and adds an adapter: the delta. Each store
updates (``StorageManager.update``, the path of ``kensho sync``), three ways:

- *origin only*: all eight at once from the origin HTTP server;
- *peers, one first*: one store updates (its peers have nothing new yet: a 404 per
  file each), then the other seven at once, each listing the seven other stores as
  ``peer+http://`` sources (each a real ``kensho share`` process) before the origin;
- *peers, all at once*: the eight at once with the same peers, none of which has the
  new chunks yet, which shows what peers cannot do without a first store.

Measured: bytes the origin served (target with peers: about one copy of the
delta, not eight) and wall time.

**S3.** One file from moto's S3 server on 127.0.0.1: ``kensho sync`` from ``s3://``
vs boto3's ``download_file`` (what ``aws s3 cp`` does: a new client, 8 MiB parts, 10
threads) plus its SHA-256 and fsync, vs ``kensho sync`` of the same file from a local
HTTP server. ``--s3-runs`` interleaved rounds (after one untimed warm-up round),
median and spread; moto runs in the same process. Each Kensho sync makes a new
source (a new botocore session, as each ``kensho sync`` process does) and each
boto3 download a new client, as each ``aws`` process does; both reuse the process's
botocore data loader after the first.

    .venv/bin/python bench/fleet_bench.py [--model-mib 64] [--delta-mib 8] [--s3-mib 64]
        [--s3-runs 5] [--s3-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from _origin import serve
from _table import machine_line, markdown_table
from kensho.storage import (
    HttpSource,
    Manifest,
    MirrorSource,
    StorageManager,
    build_manifest,
)
from kensho.storage.sources import Source, source_from_string
from kensho.telemetry import configure_logging

MiB = 1024 * 1024
STORES = 8
CHUNK = 1 * MiB


# --- releases and stores --------------------------------------------------------------


def write_releases(work: Path, model_mib: int, delta_mib: int) -> None:
    """``r1`` and ``r2`` folders: r2 rewrites ``delta_mib - 2`` MiB of the model and adds
    a 2 MiB adapter."""
    rng = os.urandom
    r1, r2 = work / "r1", work / "r2"
    for folder in (r1, r2):
        (folder / "model").mkdir(parents=True)
    model = bytearray(rng(model_mib * MiB))
    (r1 / "model/weights.bin").write_bytes(model)
    (r1 / "model/tokenizer.json").write_bytes(rng(MiB))
    (r1 / "model/config.json").write_text('{"layers": 4}')
    start = (model_mib // 2) * MiB
    changed = max(1, delta_mib - 2) * MiB
    model[start : start + changed] = rng(changed)
    (r2 / "model/weights.bin").write_bytes(model)
    shutil.copy(r1 / "model/tokenizer.json", r2 / "model/tokenizer.json")
    (r2 / "model/config.json").write_text('{"layers": 4, "adapter": true}')
    (r2 / "model/adapter.bin").write_bytes(rng(2 * MiB))


async def manifests(work: Path) -> tuple[Manifest, Manifest]:
    m1 = await build_manifest(
        work / "r1", name="fleet", version="1", serial=1, chunk_size=CHUNK, chunking="fixed"
    )
    m2 = await build_manifest(
        work / "r2", name="fleet", version="2", serial=2, chunk_size=CHUNK, chunking="fixed"
    )
    return m1, m2


async def drain(manager: StorageManager, events: object) -> None:
    async for _ in events:  # type: ignore[attr-defined]
        pass


async def fresh_stores(work: Path, m1: Manifest) -> list[Path]:
    """Eight stores on release 1, verified (as after a ``kensho sync``)."""
    roots = []
    for i in range(STORES):
        root = work / f"store{i}"
        shutil.rmtree(root, ignore_errors=True)
        async with StorageManager(root, m1, [MirrorSource(work / "r1")]) as manager:
            await drain(manager, manager.initialize_and_verify())
        roots.append(root)
    return roots


async def update(root: Path, m2: Manifest, sources: Sequence[Source]) -> None:
    async with StorageManager(root, None, sources) as manager:
        await drain(manager, manager.update(m2))
        assert manager.report is not None and manager.report.ok, root


@contextlib.contextmanager
def shares(roots: Sequence[Path], work: Path) -> Iterator[list[str]]:
    """A real ``kensho share`` process per store; yields their ``peer+http://`` URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KENSHO_")}
    env["KENSHO_LOG_LEVEL"] = "error"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kensho", "share", "--root", str(r), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=work,
        )
        for r in roots
    ]
    try:
        urls = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("kensho share: serving"):
                raise RuntimeError(f"kensho share did not start: {line!r}")
            urls.append("peer+" + line.split()[-1])
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()


def peer_sources(urls: Sequence[str], me: int, origin: str) -> list[Source]:
    """The seven other stores (rotated, so the load spreads), then the origin."""
    others = [urls[(me + k) % len(urls)] for k in range(1, len(urls))]
    return [*(source_from_string(u) for u in others), HttpSource(origin)]


async def fleet(work: Path, m1: Manifest, m2: Manifest) -> list[list[object]]:
    rows: list[list[object]] = []
    delta = sum(f.size for f in m2.files) - _reused(m1, m2)
    roots = await fresh_stores(work, m1)
    with serve(work / "r2") as (origin, server):
        started = time.perf_counter()
        await asyncio.gather(*(update(r, m2, [HttpSource(origin)]) for r in roots))
        rows.append(_row("origin only, 8 at once", server.bytes_served, delta, started))
    for mode in ("peers, 1 first then 7 at once", "peers, 8 at once"):
        roots = await fresh_stores(work, m1)
        with shares(roots, work) as urls, serve(work / "r2") as (origin, server):
            started = time.perf_counter()
            rest = range(STORES)
            if mode.startswith("peers, 1 first"):
                await update(roots[0], m2, peer_sources(urls, 0, origin))
                rest = range(1, STORES)
            await asyncio.gather(
                *(update(roots[i], m2, peer_sources(urls, i, origin)) for i in rest)
            )
            rows.append(_row(mode, server.bytes_served, delta, started))
    return rows


def _reused(m1: Manifest, m2: Manifest) -> int:
    old = {c.sha256 for f in m1.files for c in f.chunks}
    return sum(c.size for f in m2.files for c in f.chunks if c.sha256 in old)


def _row(mode: str, served: int, delta: int, started: float) -> list[object]:
    return [
        mode,
        f"{served / MiB:.1f}",
        f"{served / delta:.2f}",
        f"{time.perf_counter() - started:.2f}",
    ]


# --- S3 throughput --------------------------------------------------------------------


async def kensho_sync(root: Path, manifest: Manifest, source: Source) -> float:
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    async with StorageManager(root, manifest, [source]) as manager:
        await drain(manager, manager.initialize_and_verify())
        assert manager.report is not None and manager.report.ok
    return time.perf_counter() - started


def boto3_download(bucket: str, key: str, dest: Path, sha: str) -> float:
    """``aws s3 cp`` as boto3 does it (a new client, as each ``aws`` process makes), then
    the SHA-256 and fsync Kensho also does."""
    dest.unlink(missing_ok=True)
    started = time.perf_counter()
    boto3.client("s3").download_file(bucket, key, str(dest))
    digest = hashlib.sha256()
    with dest.open("rb") as fh:
        while block := fh.read(4 * MiB):
            digest.update(block)
        os.fsync(fh.fileno())
    assert digest.hexdigest() == sha
    return time.perf_counter() - started


async def s3_throughput(work: Path, size_mib: int, runs: int) -> list[list[object]]:
    folder = work / "s3src"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(os.urandom(size_mib * MiB))
    manifest = await build_manifest(
        folder, name="s3", version="1", chunk_size=4 * MiB, chunking="fixed"
    )
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        client.upload_file(str(folder / "blob.bin"), "bench", "rel/blob.bin")
        sha = manifest.files[0].sha256
        times: dict[str, list[float]] = {"s3": [], "boto3": [], "http": []}
        with serve(folder) as (origin, _):
            for _ in range(runs + 1):  # the first round warms up: imports, caches
                times["s3"].append(
                    await kensho_sync(
                        work / "s3dst", manifest, source_from_string("s3://bench/rel")
                    )
                )
                times["boto3"].append(
                    boto3_download("bench", "rel/blob.bin", work / "boto.bin", sha)
                )
                times["http"].append(
                    await kensho_sync(work / "httpdst", manifest, HttpSource(origin))
                )
    finally:
        moto.stop()
    label = {
        "s3": "kensho sync from s3:// (moto)",
        "boto3": "boto3 download_file + SHA-256 + fsync (moto)",
        "http": "kensho sync from http:// (local server)",
    }
    rows: list[list[object]] = []
    for key, values in times.items():
        timed = values[1:]
        mid = statistics.median(timed)
        rows.append(
            [label[key], f"{mid:.2f} ({min(timed):.2f}-{max(timed):.2f})", f"{size_mib / mid:.0f}"]
        )
    ratio = statistics.median(times["boto3"][1:]) / statistics.median(times["s3"][1:])
    rows.append(["kensho s3:// / boto3 speed", "", f"{ratio:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-mib", type=int, default=64)
    parser.add_argument("--delta-mib", type=int, default=8)
    parser.add_argument("--s3-mib", type=int, default=64)
    parser.add_argument("--s3-runs", type=int, default=5)
    parser.add_argument("--s3-only", action="store_true", help="skip the fleet simulation")
    args = parser.parse_args()
    configure_logging(level="error")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request lines
    with tempfile.TemporaryDirectory(prefix="kensho-fleet-") as tmp:
        work = Path(tmp)
        if not args.s3_only:
            write_releases(work, args.model_mib, args.delta_mib)
            m1, m2 = asyncio.run(manifests(work))
            rows = asyncio.run(fleet(work, m1, m2))
        s3_rows = asyncio.run(s3_throughput(work, args.s3_mib, args.s3_runs))
    if not args.s3_only:
        delta = sum(f.size for f in m2.files) - _reused(m1, m2)
        print(f"\nKensho fleet update: {machine_line()}")
        print(
            f"{STORES} stores, release of {sum(f.size for f in m2.files) / MiB:.0f} MiB, "
            f"delta {delta / MiB:.1f} MiB ({CHUNK // MiB} MiB chunks)\n"
        )
        print(
            markdown_table(
                ["update", "origin served (MiB)", "copies of the delta", "wall (s)"], rows
            )
        )
    print(
        f"\nS3 source throughput, {args.s3_mib} MiB file: {machine_line()}, "
        f"medians of {args.s3_runs} interleaved runs (min-max)\n"
    )
    print(markdown_table(["download", "seconds", "MiB/s"], s3_rows))


if __name__ == "__main__":
    main()
