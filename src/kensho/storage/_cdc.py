"""Content-defined chunk boundaries (FastCDC 2020, from ``pyfastcdc``).

Why content-defined: fixed-size chunks are cut at multiples of the chunk size, so one
inserted byte (a safetensors header that grows by a few bytes) moves every later
boundary and every later chunk hash changes: an update re-downloads the whole file.
FastCDC cuts where a rolling gear hash of the last bytes hits a pattern, so
boundaries follow the content and re-synchronise within a chunk or two after an
insertion. The manifest schema is the same: chunks carry offset, size and SHA-256.

Why ``pyfastcdc``: a maintained Cython implementation of the published algorithm that
cuts at 2.2-2.6 GB/s on the development machine (faster than SHA-256 there, so
chunking adds little to building a manifest). Boundaries depend on the gear table,
so ``seed`` stays 0 (the paper's table): manifests built by different publishers of
the same bytes then agree. The sizes below are pyfastcdc's own limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kensho.errors import ManifestError

__all__ = [
    "CDC_AVG_LIMITS",
    "CDC_MAX_LIMITS",
    "CDC_MIN_LIMITS",
    "CHUNKING_SCHEMES",
    "DEFAULT_CDC_AVG",
    "DEFAULT_CHUNKING",
    "CdcParams",
    "Chunking",
    "cdc_ranges",
]

#: ``fixed``: chunks of ``chunk_size`` bytes. ``cdc``: content-defined (FastCDC).
#: Defined here, not in ``builder``, so that ``kensho manifest build --help`` can
#: name the defaults without loading the hashing and manifest modules.
Chunking = Literal["fixed", "cdc"]
CHUNKING_SCHEMES: tuple[Chunking, ...] = ("fixed", "cdc")
#: Chosen from measurements of delta updates (docs/manifest.md, "Chunking").
DEFAULT_CHUNKING: Chunking = "cdc"
#: 1 MiB average: the measured choice (docs/manifest.md, "Chunking").
DEFAULT_CDC_AVG = 1 << 20
CDC_AVG_LIMITS = (256, 4 << 20)
CDC_MIN_LIMITS = (64, 1 << 20)
CDC_MAX_LIMITS = (1024, 16 << 20)


@dataclass(frozen=True, slots=True)
class CdcParams:
    """FastCDC sizes in bytes: no chunk is smaller than ``min`` (except the last one)
    or larger than ``max``; ``avg`` is the normalisation target."""

    avg: int = DEFAULT_CDC_AVG
    min: int = DEFAULT_CDC_AVG // 4
    max: int = DEFAULT_CDC_AVG * 4

    @classmethod
    def from_sizes(cls, avg: int, min: int | None = None, max: int | None = None) -> CdcParams:
        """Derive missing sizes from ``avg`` (a quarter and four times), then validate."""
        params = cls(avg, avg // 4 if min is None else min, avg * 4 if max is None else max)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise ``ManifestError`` naming the size that is out of range."""
        for label, value, (low, high) in (
            ("--cdc-avg", self.avg, CDC_AVG_LIMITS),
            ("--cdc-min", self.min, CDC_MIN_LIMITS),
            ("--cdc-max", self.max, CDC_MAX_LIMITS),
        ):
            if not low <= value <= high:
                raise ManifestError(
                    f"content-defined chunking: {label} must be between {low} and {high} "
                    f"bytes, got {value}"
                )
        if not self.min <= self.avg <= self.max:
            raise ManifestError(
                "content-defined chunking needs --cdc-min <= --cdc-avg <= --cdc-max, got "
                f"{self.min}, {self.avg}, {self.max}"
            )


def cdc_ranges(path: Path, size: int, params: CdcParams) -> list[tuple[int, int]]:
    """The ``(offset, size)`` chunks FastCDC cuts ``path`` into. Blocking.

    ``size`` is the file's size as stat'ed by the caller; an empty file has no chunks.
    """
    if size == 0:
        return []
    try:
        from pyfastcdc import FastCDC
    except ImportError:  # pragma: no cover - pyfastcdc is a dependency
        raise ManifestError(
            "content-defined chunking needs the pyfastcdc package (pip install pyfastcdc); "
            "or build with --chunking fixed"
        ) from None
    cutter = FastCDC(params.avg, min_size=params.min, max_size=params.max)
    return [(chunk.offset, chunk.length) for chunk in cutter.cut_file(str(path))]
