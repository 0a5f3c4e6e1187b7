"""Delta-update benchmark: bytes fetched and time to update a large safetensors file.

Three cases on one file of a few hundred MB (generated in a temp dir with the
``safetensors`` package): one tensor changed in place, a header that grew (every
tensor byte shifts), and data appended. For each, the bytes a local HTTP server
sends (Range and multi-range aware, counting every body byte) when the store updates:

- Kensho with fixed-size chunks (4 MiB, 1 MiB) and content-defined chunks (FastCDC,
  average 64 KiB, 256 KiB, 1 MiB), through ``StorageManager.update``;
- a full re-download, what pooch or huggingface_hub without Xet fetch (timed as an
  httpx download to a file with a SHA-256 of it, like pooch);
- ``zsync`` (Debian's 0.6.2) with the old file as seed, when it is installed; its
  ``.zsync`` control file is counted in what it fetched.

Target: with the default chunking, bytes fetched <= bytes changed + 2 chunks per
changed region (a chunk = the mean chunk size of the new file). Manifests and
``.zsync`` files are built beforehand (publisher side), not timed.

    .venv/bin/python bench/delta_bench.py [--size-mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save_file

from _origin import serve
from _table import machine_line, markdown_table
from kensho.storage import (
    DEFAULT_CHUNKING,
    CdcParams,
    HttpSource,
    Manifest,
    StorageManager,
    build_manifest,
    dump_manifest,
)
from kensho.storage._cdc import DEFAULT_CDC_AVG
from kensho.telemetry import configure_logging

KiB, MiB = 1024, 1024 * 1024
MODEL = "model.safetensors"
CASES = ("tensor change", "header growth", "append")


@dataclass(frozen=True)
class Scheme:
    label: str
    chunking: str
    size: int

    @property
    def is_default(self) -> bool:
        return self.chunking == DEFAULT_CHUNKING and (
            (self.chunking == "fixed" and self.size == 4 * MiB) or self.size == DEFAULT_CDC_AVG
        )


SCHEMES = (
    Scheme("fixed 4 MiB", "fixed", 4 * MiB),
    Scheme("fixed 1 MiB", "fixed", 1 * MiB),
    Scheme("CDC avg 64 KiB", "cdc", 64 * KiB),
    Scheme("CDC avg 256 KiB", "cdc", 256 * KiB),
    Scheme("CDC avg 1 MiB", "cdc", 1 * MiB),
)


# --- the files ------------------------------------------------------------------------


def make_versions(work: Path, size_mib: int) -> dict[str, int]:
    """Write v1 and the three new versions; return the bytes changed in each case."""
    tensors_count = max(4, size_mib // 8)
    rng = np.random.default_rng(7)
    weights = {
        f"model.layers.{i}.weight": rng.standard_normal((2048, 1024), np.float32)
        for i in range(tensors_count)
    }
    (work / "v1").mkdir()
    save_file(weights, str(work / "v1" / MODEL))
    changed: dict[str, int] = {}
    # 1. one tensor retrained in place: same shape, same header.
    k = f"model.layers.{tensors_count // 2}.weight"
    tuned = dict(weights)
    tuned[k] = (weights[k] * 0.5).astype(np.float32)
    (work / "tensor change").mkdir()
    save_file(tuned, str(work / "tensor change" / MODEL))
    changed["tensor change"] = tuned[k].nbytes
    # 2. metadata added: the header grows and every tensor byte moves.
    (work / "header growth").mkdir()
    meta = {"format": "pt", "note": "fine-tuned checkpoint, step 12000, lr 3e-5, bf16 master"}
    save_file(weights, str(work / "header growth" / MODEL), metadata=meta)
    new = (work / "header growth" / MODEL).read_bytes()[:8]
    changed["header growth"] = 8 + int.from_bytes(new, "little")  # the whole new header
    # 3. data appended at the end.
    (work / "append").mkdir()
    extra = rng.bytes(16 * MiB)
    with (work / "append" / MODEL).open("wb") as out, (work / "v1" / MODEL).open("rb") as src:
        shutil.copyfileobj(src, out, 16 * MiB)
        out.write(extra)
    changed["append"] = len(extra)
    return changed


async def build(folder: Path, scheme: Scheme, serial: int) -> Manifest:
    cdc = CdcParams.from_sizes(scheme.size) if scheme.chunking == "cdc" else None
    return await build_manifest(
        folder,
        name="bench",
        version=f"1.{serial}",
        serial=serial,
        chunking="cdc" if scheme.chunking == "cdc" else "fixed",
        chunk_size=scheme.size if scheme.chunking == "fixed" else None,
        cdc=cdc,
    )


# --- contenders -----------------------------------------------------------------------


async def kensho_update(
    work: Path, case: str, m1: Manifest, m2: Manifest
) -> tuple[int, int, float]:
    """(bytes served, requests, seconds) for one update of a fresh store."""
    root = work / "store"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    os.link(work / "v1" / MODEL, root / MODEL)  # the old version; replaced, never modified
    async with StorageManager(root, m1) as manager:
        async for _ in manager.initialize_and_verify():
            pass
    with serve(work / case) as (url, server):
        source = HttpSource(url)
        start = time.perf_counter()
        async with StorageManager(root, None, [source]) as manager:
            async for _ in manager.update(m2):
                pass
        seconds = time.perf_counter() - start
        served, requests = server.bytes_served, server.requests
    entry = m2.file(MODEL)
    assert entry is not None
    digest = hashlib.file_digest((root / MODEL).open("rb"), "sha256").hexdigest()
    assert digest == entry.sha256, "the update produced the wrong file"
    shutil.rmtree(root)
    return served, requests, seconds


def full_download(work: Path, case: str) -> tuple[int, float]:
    """What pooch does: GET the whole file to a temp file, SHA-256 it, rename."""
    out = work / "full.part"
    with serve(work / case) as (url, server):
        start = time.perf_counter()
        digest = hashlib.sha256()
        with (
            httpx.Client() as client,
            client.stream("GET", url + MODEL) as resp,
            out.open("wb") as fh,
        ):
            for piece in resp.iter_raw(MiB):
                fh.write(piece)
                digest.update(piece)
            fh.flush()
            os.fsync(fh.fileno())
        out.replace(work / "full.bin")
        seconds = time.perf_counter() - start
        served = server.bytes_served
    (work / "full.bin").unlink()
    return served, seconds


def zsync_update(work: Path, case: str) -> tuple[int, int, float, int] | None:
    """(bytes served, requests, seconds, control file bytes), or None without zsync."""
    if not (shutil.which("zsync") and shutil.which("zsyncmake")):
        return None
    folder = work / case
    control = folder / (MODEL + ".zsync")
    if not control.exists():
        subprocess.run(
            ["zsyncmake", "-u", MODEL, "-o", str(control), str(folder / MODEL)],
            check=True,
            capture_output=True,
        )
    scratch = work / "zsync-out"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    with serve(folder) as (url, server):
        start = time.perf_counter()
        done = subprocess.run(
            [
                "zsync",
                "-q",
                "-i",
                str(work / "v1" / MODEL),
                "-o",
                "new.bin",
                url + MODEL + ".zsync",
            ],
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - start
        served, requests = server.bytes_served, server.requests
    if done.returncode != 0:
        print(f"zsync failed on {case}: {done.stderr.strip()}", file=sys.stderr)
        return None
    assert (scratch / "new.bin").read_bytes() == (folder / MODEL).read_bytes()
    shutil.rmtree(scratch)
    return served, requests, seconds, control.stat().st_size


# --- report ---------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= 0.01 * MiB else f"{n / KiB:.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of the model file")
    args = parser.parse_args()
    configure_logging(level="error")
    with tempfile.TemporaryDirectory(prefix="kensho-delta-") as tmp:
        work = Path(tmp)
        changed = make_versions(work, args.size_mib)
        size = (work / "v1" / MODEL).stat().st_size
        rows: list[list[object]] = []
        summary: list[list[object]] = []
        for scheme in SCHEMES:
            m1 = asyncio.run(build(work / "v1", scheme, 1))
            entry1 = m1.file(MODEL)
            assert entry1 is not None
            manifest_bytes = len(dump_manifest(m1))
            total = 0
            met = 0
            for case in CASES:
                m2 = asyncio.run(build(work / case, scheme, 2))
                entry = m2.file(MODEL)
                assert entry is not None
                served, requests, seconds = asyncio.run(kensho_update(work, case, m1, m2))
                mean_chunk = entry.size / len(entry.chunks)
                budget = changed[case] + 2 * mean_chunk
                ok = served <= budget
                met += ok
                total += served
                label = scheme.label + (" (default)" if scheme.is_default else "")
                rows.append(
                    [
                        case,
                        f"Kensho {label}",
                        mb(served),
                        requests,
                        mb(budget),
                        "yes" if ok else "no",
                        f"{seconds:.2f} s",
                    ]
                )
            summary.append(
                [
                    scheme.label + (" (default)" if scheme.is_default else ""),
                    len(entry1.chunks),
                    mb(entry1.size / len(entry1.chunks)),
                    mb(manifest_bytes),
                    mb(manifest_bytes * (1 << 30) / size),
                    mb(total),
                    f"{met}/3",
                ]
            )
        for case in CASES:
            served, seconds = full_download(work, case)
            rows.append(
                [
                    case,
                    "full re-download (pooch, huggingface_hub without Xet)",
                    mb(served),
                    1,
                    "",
                    "",
                    f"{seconds:.2f} s",
                ]
            )
            z = zsync_update(work, case)
            if z is None:
                rows.append([case, "zsync", "not available", "", "", "", ""])
                continue
            served, requests, seconds, control = z
            rows.append(
                [
                    case,
                    f"zsync 0.6.2 (incl. {mb(control)} .zsync file)",
                    mb(served),
                    requests,
                    "",
                    "",
                    f"{seconds:.2f} s",
                ]
            )
        rows.sort(key=lambda r: CASES.index(str(r[0])))

    print(f"\nKensho delta updates: {machine_line()}")
    print(
        f"one safetensors file of {mb(size)}; changed bytes: "
        + ", ".join(f"{c} {mb(n)}" for c, n in changed.items())
        + "; HTTP on 127.0.0.1; 'within target' = fetched <= changed + 2 mean chunks\n"
    )
    print(
        markdown_table(
            [
                "case",
                "contender",
                "bytes fetched",
                "requests",
                "target: changed + 2 mean chunks",
                "within target",
                "time to update",
            ],
            rows,
        )
    )
    print()
    print(
        markdown_table(
            [
                "chunking",
                "chunks in file",
                "mean chunk",
                "manifest",
                "manifest per GiB",
                "fetched, 3 cases",
                "within target",
            ],
            summary,
        )
    )


if __name__ == "__main__":
    main()
