"""Sources from their text form (``--source``, ``storage.sources``) and the settings."""

from __future__ import annotations

from typing import TypedDict, Unpack
from urllib.parse import urlsplit

from kensho.config import StorageSettings
from kensho.errors import SourceError
from kensho.storage.sources._base import Source
from kensho.storage.sources.http import HttpSource
from kensho.storage.sources.mdns import DEFAULT_DISCOVERY_TIMEOUT, MDNS_SCHEME, mdns_source
from kensho.storage.sources.mirror import MirrorSource
from kensho.storage.sources.object_store import OBJECT_STORE_SCHEMES, ObjectStoreSource
from kensho.storage.sources.peer import PeerSource

__all__ = ["HttpOptions", "http_options", "source_from_string"]

#: Connecting never waits longer than this, even with a long ``storage.source_timeout``.
_MAX_CONNECT_TIMEOUT = 10.0
#: A peer is on the local network: it connects within this, and answers within
#: ``_PEER_READ_TIMEOUT`` (or the shorter ``storage.source_timeout``); the origin is
#: behind it, so waiting longer on a peer only delays the origin.
_PEER_CONNECT_TIMEOUT = 2.0
_PEER_READ_TIMEOUT = 5.0
_PEER_RATE_WINDOW = 10.0


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
    """``http(s)://...`` gives an :class:`HttpSource`; a path or ``file://`` a mirror;
    ``s3://``, ``gs://``, ``az://`` an :class:`ObjectStoreSource`; ``peer+http://`` a
    :class:`PeerSource`; ``peer+mdns://`` the peers that announce themselves on the LAN
    (:class:`~kensho.storage.sources.mdns.MdnsPeers`, the ``mdns`` extra).

    An HTTP source takes its timeouts, retries and minimum rate from ``settings``
    (``[storage]``) when given; explicit ``options`` win over both. Object stores
    and peers take the timeout, retries and minimum rate that apply to them.
    """
    scheme = urlsplit(spec).scheme.lower()
    if scheme in {"http", "https"}:
        merged = http_options(settings) if settings is not None else HttpOptions()
        merged.update(options)
        return HttpSource(spec, **merged)
    if scheme in OBJECT_STORE_SCHEMES:
        if settings is None:
            return ObjectStoreSource(spec)
        return ObjectStoreSource(
            spec, attempts=settings.source_retries + 1, timeout=settings.source_timeout
        )
    if scheme in {"peer+http", "peer+https"}:
        return _peer(spec, settings)
    if scheme == MDNS_SCHEME:
        timeout = settings.discovery_timeout if settings else DEFAULT_DISCOVERY_TIMEOUT
        return mdns_source(spec, timeout=timeout, make_peer=lambda url: _peer(url, settings))
    if scheme in {"", "file"} or len(scheme) == 1:  # one letter: a Windows drive
        return MirrorSource(spec)
    raise SourceError(
        f"unsupported source {spec!r}: use a folder, file://, http(s)://, s3://, gs://, "
        "az://, peer+http:// or peer+mdns://"
    )


def _peer(spec: str, settings: StorageSettings | None) -> PeerSource:
    if settings is None:
        return PeerSource(spec)
    return PeerSource(
        spec,
        connect_timeout=min(settings.source_timeout, _PEER_CONNECT_TIMEOUT),
        read_timeout=min(settings.source_timeout, _PEER_READ_TIMEOUT),
        min_rate=float(settings.source_min_rate),
        rate_window=min(settings.source_rate_window, _PEER_RATE_WINDOW),
    )
