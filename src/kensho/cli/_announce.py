"""Announce this device's chunk server on the LAN (mDNS/DNS-SD), for ``peer+mdns://``.

``kensho share --announce`` and ``kensho up`` with ``[share] announce = true``
register one service of type :data:`~kensho.storage.sources.mdns.SERVICE_TYPE` once
they listen, and withdraw it (DNS-SD "goodbye" packets, TTL 0) when they stop, so
browsers forget the peer at once instead of after the records' TTL. A start-up that
fails never announced anything: the announcement starts only once the port serves.

Where it is heard is decided by the address the server binds, so that announcing
never exposes more than binding already does:

- a loopback address (the default, 127.0.0.1): on the loopback interface only, so
  only stores on this machine hear it;
- one address: on that interface, with that address;
- ``0.0.0.0`` or ``::``: on every interface, with every non-loopback address.

What is announced is in :func:`~kensho.storage.sources.mdns.txt_record`: the port,
the protocol, whether an API key is required, and a random id; the instance name
and host name are ``kensho-<id>``, not the machine's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kensho.errors import ConfigError, SourceError
from kensho.storage.sources.mdns import SERVICE_TYPE, own_ids, require_zeroconf, txt_record
from kensho.telemetry import get_logger

if TYPE_CHECKING:
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    from kensho.config import Settings

__all__ = ["Announcement", "Reach", "UpAnnouncer", "check_announce", "reach_of"]

_log = get_logger("share")


@dataclass(frozen=True)
class Reach:
    """Where an announcement is made: the addresses it carries, the interfaces it is sent on.

    ``interfaces`` is ``None`` for every interface.
    """

    addresses: tuple[str, ...]
    interfaces: tuple[str, ...] | None


def _host_addresses() -> list[str]:
    """This machine's non-loopback IP addresses (IPv6 link-local left out: no scope in a URL)."""
    import ifaddr  # zeroconf's own dependency

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            address = ipaddress.ip_address(text)
            if not (address.is_loopback or address.is_link_local) and text not in found:
                found.append(text)
    return found


def _resolved(host: str) -> list[str]:
    """The IP addresses ``host`` (an address or a name) binds."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SourceError(f"cannot announce {host!r}: it does not resolve ({exc})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def reach_of(host: str) -> Reach:
    """Where to announce a server bound to ``host`` (see the module's docstring)."""
    if host in {"", "0.0.0.0", "::"}:  # noqa: S104 - naming the wildcard, not binding it
        addresses = _host_addresses()
        if host != "::":
            addresses = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        return Reach(tuple(addresses), None)
    addresses = _resolved(host)
    if all(ipaddress.ip_address(a).is_loopback for a in addresses):
        return Reach(tuple(addresses), ("127.0.0.1",))
    v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
    return Reach(tuple(addresses), tuple(v4) if len(v4) == len(addresses) else None)


class Announcement:
    """One DNS-SD registration of a chunk server at ``host``:``port``, while it serves.

    :meth:`start_soon` registers in the background (DNS-SD probes for the name for
    about a second and a half, which should not delay serving); :meth:`stop` withdraws
    it, whatever stage it reached. ``service_type`` lets tests announce a type of
    their own.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        api_key_required: bool,
        service_type: str = SERVICE_TYPE,
    ) -> None:
        require_zeroconf("announcing on the LAN")
        self.instance_id = secrets.token_hex(8)
        self.host = host
        self.reach = Reach((), None)  # found at start (a name may not resolve then)
        self.port = port
        self.service_type = service_type
        self.name = f"kensho-{self.instance_id}.{service_type}"
        self.properties = txt_record(auth=api_key_required, instance_id=self.instance_id)
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._registered = False

    def start_soon(self, *, until: asyncio.Event | None = None) -> None:
        """Register from a task of the running loop; a failure is logged, serving goes on.

        ``until``: withdraw as soon as it is set (``kensho up``'s drain begins: from
        then on its chunk route answers 503, which would get it distrusted).
        """
        self._task = asyncio.get_running_loop().create_task(self._run(until))

    async def start(self) -> None:
        """Register now (returns once the name is probed and announced)."""
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        self.reach = await asyncio.to_thread(reach_of, self.host)  # a name may ask DNS
        if not self.reach.addresses:
            raise SourceError("this machine has no address to announce on the LAN")
        v4_only = all(ipaddress.ip_address(a).version == 4 for a in self.reach.addresses)
        own_ids.add(self.instance_id)
        self._zc = AsyncZeroconf(
            interfaces=list(self.reach.interfaces or ()) or InterfaceChoice.All,
            ip_version=IPVersion.V4Only if v4_only else IPVersion.All,
        )
        self._info = AsyncServiceInfo(
            self.service_type,
            self.name,
            port=self.port,
            parsed_addresses=list(self.reach.addresses),
            properties=self.properties,
            server=f"kensho-{self.instance_id}.local.",
        )
        await (await self._zc.async_register_service(self._info, allow_name_change=True))
        self._registered = True
        _log.info(
            "announced on the LAN",
            instance=self._info.name,
            addresses=list(self.reach.addresses),
            port=self.port,
            auth=self.properties["auth"],
        )

    async def _run(self, until: asyncio.Event | None) -> None:
        try:
            await self.start()
        except Exception as exc:  # no address, no socket, zeroconf's own errors
            _log.warning("cannot announce on the LAN; serving without it", reason=repr(exc))
            return
        if until is not None:
            await until.wait()
            await self.stop()

    async def stop(self) -> None:
        """Withdraw the announcement (goodbye packets) and close the sockets. Safe twice,
        and from its own task: a second caller waits for the same withdrawal."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            if self._zc is not None:
                await self._zc.async_close()  # unregisters what it registered: the goodbyes
        finally:
            own_ids.discard(self.instance_id)
        if self._registered:
            _log.info("announcement withdrawn", instance=self.name)


class UpAnnouncer:
    """``kensho up``'s ``[share] announce``: on the LAN from the moment it listens until
    it begins to drain (or stops); nothing when the setting is off."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.announcement: Announcement | None = None

    def start(self, port: int | None, draining: asyncio.Event) -> None:
        if self.settings.share.announce and port is not None:
            key = bool(self.settings.server.api_key)
            self.announcement = Announcement(self.settings.server.host, port, api_key_required=key)
            self.announcement.start_soon(until=draining)  # peers stop asking at the drain

    async def stop(self) -> None:
        if self.announcement is not None:
            await self.announcement.stop()


def check_announce(settings: Settings) -> None:
    """Refuse ``[share] announce`` that cannot be honoured, before ``kensho up`` boots."""
    if not settings.share.announce:
        return
    if not settings.share.enabled:
        raise ConfigError(
            "share.announce is on but share.enabled is off: there are no chunks to announce",
            key="share.announce",
        )
    try:
        require_zeroconf("share.announce")
    except SourceError as exc:
        raise ConfigError(str(exc), key="share.announce") from None
