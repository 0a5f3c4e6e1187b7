"""Sources from their text form (``--source``, ``storage.sources``) and the settings."""

from __future__ import annotations

from typing import TypedDict, Unpack
from urllib.parse import urlsplit

from kensho.config import StorageSettings
from kensho.errors import SourceError
from kensho.storage.sources._base import Source
from kensho.storage.sources.http import HttpSource
from kensho.storage.sources.mirror import MirrorSource

__all__ = ["HttpOptions", "http_options", "source_from_string"]

#: Connecting never waits longer than this, even with a long ``storage.source_timeout``.
_MAX_CONNECT_TIMEOUT = 10.0


class HttpOptions(TypedDict, total=False):
    """Keyword options of :class:`HttpSource` that a source string may be given."""

    connect_timeout: float
    read_timeout: float
    attempts: int
    retry_timeout: float
    wait_initial: float
    wait_max: float
    wait_jitter: float
    min_rate: float
    rate_window: float


def http_options(settings: StorageSettings) -> HttpOptions:
    """The :class:`HttpSource` options that ``[storage]`` settings ask for."""
    return HttpOptions(
        connect_timeout=min(settings.source_timeout, _MAX_CONNECT_TIMEOUT),
        read_timeout=settings.source_timeout,
        attempts=settings.source_retries + 1,
        min_rate=float(settings.source_min_rate),
        rate_window=settings.source_rate_window,
    )


def source_from_string(
    spec: str, *, settings: StorageSettings | None = None, **options: Unpack[HttpOptions]
) -> Source:
    """``http(s)://...`` gives an :class:`HttpSource`; a path or ``file://`` a mirror.

    An HTTP source takes its timeouts, retries and minimum rate from ``settings``
    (``[storage]``) when given; explicit ``options`` win over both.
    """
    scheme = urlsplit(spec).scheme.lower()
    if scheme in {"http", "https"}:
        merged = http_options(settings) if settings is not None else HttpOptions()
        merged.update(options)
        return HttpSource(spec, **merged)
    if scheme in {"", "file"} or len(scheme) == 1:  # one letter: a Windows drive
        return MirrorSource(spec)
    raise SourceError(f"unsupported source {spec!r}: use a folder, file://, http:// or https://")
