"""Peers found on the LAN (``peer+mdns://``): mDNS/DNS-SD discovery of Kensho chunk servers.

A ``kensho share --announce`` (or ``kensho up`` with ``[share] announce = true``)
registers a DNS-SD service of type :data:`SERVICE_TYPE` on the LAN, the way
Syncthing's local discovery and AirPlay/printers announce themselves. A store that
lists ``peer+mdns://`` among its sources browses for that type when a run first
needs bytes (``storage.discovery_timeout`` seconds, 1.5 by default, once per
release the run builds), and asks each peer found as a ``peer+http://HOST:PORT``
source would (:class:`~kensho.storage.sources.peer.PeerSource`): every chunk hashed,
a liar distrusted for the run, a 404 cheap. Nothing found: one log line, and the
file goes to the next source.

What the announcement says (its TXT record, :func:`txt_record`), and nothing more:

- ``v``: the chunk protocol (``1``: ``GET /v1/kensho/chunks/{sha256}`` over HTTP);
  a browser skips versions it does not speak;
- ``auth``: ``bearer`` if the server wants an API key (never the key), else ``none``;
  a browser with no ``KENSHO_PEER_API_KEY`` skips a peer that wants one rather than
  being refused by it;
- ``id``: a random token drawn when the announcement starts, so that a process that
  both announces and browses (``kensho up``) does not ask itself.

Why discovery is lazy and bounded: a boot whose files are good never browses, and
one that must repair waits at most the timeout before its first byte; the origin is
always behind the peers. zeroconf is optional (the ``mdns`` extra): it is imported
only when a ``peer+mdns://`` source is made or an announcement starts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from kensho.errors import SourceError
from kensho.storage.sources._base import Sink, SourceUnreachableError
from kensho.storage.sources.peer import PEER_API_KEY_ENV, PeerSource
from kensho.telemetry import get_logger

if TYPE_CHECKING:
    from zeroconf import Zeroconf

    from kensho.storage.manifest import Manifest

__all__ = [
    "DEFAULT_DISCOVERY_TIMEOUT",
    "MDNS_SCHEME",
    "MDNS_SPEC",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "MdnsPeers",
    "PeerAd",
    "PeerBrowser",
    "ZeroconfBrowser",
    "mdns_source",
    "own_ids",
    "peer_ad",
    "require_zeroconf",
    "txt_record",
]

_log = get_logger("storage.source")

#: The DNS-SD service type Kensho chunk servers register.
SERVICE_TYPE = "_kensho-chunks._tcp.local."
#: The source scheme that discovers peers, and the one spec it takes.
MDNS_SCHEME = "peer+mdns"
MDNS_SPEC = "peer+mdns://"
#: The chunk protocol announced in the TXT record's ``v``.
PROTOCOL_VERSION = "1"
#: Seconds a browse listens when no setting says otherwise (``storage.discovery_timeout``).
#: Answers to its one-shot queries come back within a few tens of milliseconds on a
#: LAN (RFC 6762 lets a responder wait up to 500 ms before answering a shared record);
#: 1.5 s also covers the browser's second query, a second after the first.
DEFAULT_DISCOVERY_TIMEOUT = 1.5
#: Milliseconds to ask for the records of a service the browse saw but whose address
#: did not come with its answer (it usually does, as additional records).
_RESOLVE_MS = 500

#: The ``id`` of every announcement this process is making: its own browses skip them.
own_ids: set[str] = set()


def require_zeroconf(what: str) -> None:
    """Raise ``SourceError`` naming the extra if the zeroconf package is not installed."""
    try:
        import zeroconf  # noqa: F401
    except ImportError:
        raise SourceError(
            f"{what} needs the zeroconf package, which is not installed: pip install 'kensho[mdns]'"
        ) from None


def txt_record(*, auth: bool, instance_id: str) -> dict[str, str]:
    """The TXT properties of an announcement: protocol, whether a key is needed, its id."""
    return {"v": PROTOCOL_VERSION, "auth": "bearer" if auth else "none", "id": instance_id}


@dataclass(frozen=True)
class PeerAd:
    """One announcement found on the LAN, as a peer source needs it."""

    name: str  # the DNS-SD instance name
    url: str  # peer+http://HOST:PORT
    auth: bool  # the peer wants an API key
    instance_id: str


def _text(properties: Mapping[bytes, bytes | None], key: bytes) -> str:
    value = properties.get(key)
    return value.decode("utf-8", "replace") if value is not None else ""


def _url_host(addresses: Iterable[str]) -> str | None:
    """The address to reach a peer at: IPv4 first, then a routable IPv6 (bracketed).

    An IPv6 link-local address needs its interface's scope, which a URL cannot carry
    portably, so it is never chosen.
    """
    v6: str | None = None
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.is_unspecified or address.is_multicast:
            continue
        if address.version == 4:
            return text
        if v6 is None and not address.is_link_local:
            v6 = f"[{text}]"
    return v6


def peer_ad(
    name: str, addresses: Sequence[str], port: int | None, properties: Mapping[bytes, bytes | None]
) -> PeerAd | None:
    """The peer a service record describes, or ``None`` (logged why) if it is none to ask."""
    version = _text(properties, b"v")
    host = _url_host(addresses)
    why = None
    if version != PROTOCOL_VERSION:
        why = f"speaks chunk protocol {version or '(none)'}, not {PROTOCOL_VERSION}"
    elif host is None:
        why = "announces no usable address"
    elif port is None or not 0 < port < 65536:
        why = f"announces port {port}"
    if why is not None:
        _log.debug("skipping an mDNS announcement", instance=name, reason=why)
        return None
    return PeerAd(
        name=name,
        url=f"peer+http://{host}:{port}",
        auth=_text(properties, b"auth") != "none",  # anything but "none" wants a key
        instance_id=_text(properties, b"id"),
    )


class PeerBrowser(Protocol):
    """Lists the peers announcing themselves, listening for ``seconds``."""

    async def browse(self, seconds: float) -> list[PeerAd]:
        """The announcements heard within ``seconds``, in the order they were heard."""
        ...


class ZeroconfBrowser:
    """Browses :data:`SERVICE_TYPE` with python-zeroconf on the LAN (IPv4 multicast).

    It listens on every interface, loopback included, so announcements of stores on
    this machine are heard too. ``sleep`` is how the browse waits out its window, on
    which clock: inject a virtual one (``kensho.runtime.clock.VirtualClock.sleep``) to
    test the timeout without waiting.
    ``service_type`` lets tests browse a type of their own.
    """

    def __init__(
        self,
        *,
        service_type: str = SERVICE_TYPE,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        require_zeroconf(MDNS_SPEC)
        self.service_type = service_type
        self._sleep = sleep

    async def browse(self, seconds: float) -> list[PeerAd]:
        from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        heard: list[str] = []

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            if state_change is ServiceStateChange.Added and name not in heard:
                heard.append(name)

        try:
            # unicast: query from a port of our own (RFC 6762 "legacy unicast"), so that
            # answers come straight to this socket. Asked from port 5353, they may be
            # sent by unicast to 5353, which reaches only one of the sockets bound to it
            # when another mDNS stack runs on the host (avahi, a `kensho up` announcing),
            # or by multicast at most once a second per record. Measured with a second
            # zeroconf on the host: heard after 1.15-1.22 s from 5353, 0.07-0.08 s so.
            aiozc = AsyncZeroconf(
                interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only, unicast=True
            )
        except OSError as exc:
            raise SourceUnreachableError(f"{MDNS_SPEC} cannot listen on the LAN: {exc}") from exc
        try:
            browser = AsyncServiceBrowser(aiozc.zeroconf, [self.service_type], handlers=[on_change])
            try:
                await self._sleep(seconds)
            finally:
                await browser.async_cancel()
            found = await asyncio.gather(*(self._resolve(aiozc.zeroconf, n) for n in heard))
        finally:
            await aiozc.async_close()
        return [ad for ad in found if ad is not None]

    async def _resolve(self, zc: Zeroconf, name: str) -> PeerAd | None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(self.service_type, name)
        if not await info.async_request(zc, _RESOLVE_MS):
            _log.debug("an mDNS announcement vanished before it resolved", instance=name)
            return None
        return peer_ad(name, info.parsed_addresses(), info.port, info.properties)


class MdnsPeers:
    """``peer+mdns://``: the peers announcing themselves on the LAN, asked in turn.

    A :class:`~kensho.storage.sources.ChunkAddressed` source like each peer it
    stands for. The browse happens at the first fetch after :meth:`know` (once per
    release a run builds, so a long-running ``kensho up`` hears of peers that came
    later); a peer heard again keeps its :class:`PeerSource`, and so its distrust,
    for the life of this source (one run). ``make_peer`` builds the source for a
    ``peer+http://`` URL (the factory gives it the ``[storage]`` timeouts); peers
    that want an API key are asked only when ``KENSHO_PEER_API_KEY`` is set.

    A range goes to one peer after the other (the first one rotates, to spread the
    load) until one delivers it: a peer that lacks a chunk, is busy, or is
    distrusted costs one short request. When a peer fails after delivering some
    whole chunks, the next one is asked for the rest; one that broke off inside a
    chunk ends the turn of the whole source, and the next source fills in.
    """

    def __init__(
        self,
        browser: PeerBrowser,
        *,
        timeout: float = DEFAULT_DISCOVERY_TIMEOUT,
        make_peer: Callable[[str], PeerSource] = PeerSource,
    ) -> None:
        self.browser = browser
        self.timeout = timeout
        self._make_peer = make_peer
        self._has_key = bool(os.environ.get(PEER_API_KEY_ENV))  # what each PeerSource sends
        self._made: dict[str, PeerSource] = {}  # by URL, every peer of the run
        self._live: list[PeerSource] = []
        self._fresh = False
        self._manifest: Manifest | None = None
        self._lock = asyncio.Lock()
        self._turn = 0

    @property
    def name(self) -> str:
        return MDNS_SPEC

    @property
    def peers(self) -> list[str]:
        """The URLs of the peers found by the last browse."""
        return [peer.name for peer in self._live]

    def know(self, manifest: Manifest) -> None:
        """Take the release the run builds; the next fetch browses the LAN again."""
        self._manifest = manifest
        self._fresh = False
        for peer in self._made.values():
            peer.know(manifest)

    async def aclose(self) -> None:
        for peer in self._made.values():
            await peer.aclose()

    async def discover(self) -> list[str]:
        """Browse now unless this release's browse is done; the peers' URLs."""
        async with self._lock:
            if not self._fresh:
                ads = await self.browser.browse(self.timeout)
                urls = dict.fromkeys(ad.url for ad in ads if self._usable(ad))  # heard twice: once
                self._live = [self._peer(url) for url in urls]
                self._fresh = True
                if self._live:
                    _log.info("peers found on the LAN", source=MDNS_SPEC, peers=self.peers)
                else:
                    _log.warning(
                        f"no Kensho peer answered on the LAN within {self.timeout:g} s; "
                        "asking the next source",
                        source=MDNS_SPEC,
                    )
        return self.peers

    def _usable(self, ad: PeerAd) -> bool:
        if ad.instance_id and ad.instance_id in own_ids:
            return False  # this process's own announcement
        if ad.auth and not self._has_key:
            _log.warning(
                f"skipping a peer on the LAN that requires an API key: set {PEER_API_KEY_ENV}",
                peer=ad.url,
            )
            return False
        return True

    def _peer(self, url: str) -> PeerSource:
        peer = self._made.get(url)
        if peer is None:
            peer = self._made[url] = self._make_peer(url)
            if self._manifest is not None:
                peer.know(self._manifest)
        return peer

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        await self.discover()
        peers = [peer for peer in self._rotated() if peer.abandoned is None]
        if not peers:
            raise self._none_left()
        starts = {c.offset for c in peers[0].chunks_for(path, offset, length, file_size)}
        delivered = 0

        async def counted(data: bytes) -> None:
            nonlocal delivered
            await sink(data)
            delivered += len(data)

        errors: list[SourceError] = []
        for peer in peers:
            try:
                await peer.fetch(path, offset + delivered, length - delivered, file_size, counted)
                return
            except SourceError as exc:
                if offset + delivered not in starts:
                    raise  # broke off inside a chunk: the sink holds part of it
                errors.append(exc)
        if all(isinstance(e, SourceUnreachableError) for e in errors):
            raise SourceUnreachableError("; ".join(map(str, errors)))
        raise SourceError("; ".join(map(str, errors)))

    def _rotated(self) -> list[PeerSource]:
        live = self._live
        if not live:
            return []
        first = self._turn % len(live)
        self._turn += 1
        return live[first:] + live[:first]

    def _none_left(self) -> SourceError:
        if not self._live:
            return SourceUnreachableError(
                f"no Kensho peer announced itself on the LAN within {self.timeout:g} s"
            )
        return SourceError(f"every peer found on the LAN is distrusted for this run: {self.peers}")


def mdns_source(
    spec: str, *, timeout: float, make_peer: Callable[[str], PeerSource] = PeerSource
) -> MdnsPeers:
    """The source for ``peer+mdns://`` (nothing may follow the ``//``)."""
    parts = urlsplit(spec)
    if parts.scheme.lower() != MDNS_SCHEME or parts.netloc or parts.path.strip("/") or parts.query:
        raise SourceError(
            f"{spec!r}: write {MDNS_SPEC} alone; it finds its peers on the LAN "
            "(list a known peer as peer+http://HOST:PORT)"
        )
    return MdnsPeers(ZeroconfBrowser(), timeout=timeout, make_peer=make_peer)
