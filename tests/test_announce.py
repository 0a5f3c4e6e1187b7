"""Announcing a chunk server on the LAN (``kensho.cli._announce``), with real mDNS.

An :class:`Announcement` registers a real DNS-SD service (its own service type per
test, so tests side by side never hear each other); an independent zeroconf
browser (:func:`_mdns_support.watching`) sees it added with its records, and
removed by the goodbye packets of :meth:`Announcement.stop` — long before the
records' TTL (75 s and more) would have let it lapse.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from zeroconf import ServiceStateChange

from _mdns_support import service_type, watching
from kensho.cli._announce import Announcement, reach_of
from kensho.errors import SourceError
from kensho.storage.sources.mdns import (
    DEFAULT_DISCOVERY_TIMEOUT,
    MdnsPeers,
    ZeroconfBrowser,
    own_ids,
)


def test_a_loopback_bind_is_announced_on_the_loopback_interface_only() -> None:
    for host in ["127.0.0.1", "localhost"]:
        reach = reach_of(host)
        assert reach.interfaces == ("127.0.0.1",)
        assert all(ipaddress.ip_address(a).is_loopback for a in reach.addresses)


def test_one_address_is_announced_on_that_interface_with_that_address() -> None:
    reach = reach_of("10.1.2.3")
    assert reach.addresses == ("10.1.2.3",)
    assert reach.interfaces == ("10.1.2.3",)


def test_the_wildcard_bind_announces_every_non_loopback_address_on_every_interface() -> None:
    reach = reach_of("0.0.0.0")
    assert reach.interfaces is None
    for text in reach.addresses:
        address = ipaddress.ip_address(text)
        assert address.version == 4
        assert not address.is_loopback
    assert set(reach.addresses) <= set(reach_of("::").addresses)


def test_a_bind_name_that_does_not_resolve_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="does not resolve"):
        reach_of("no-such-host.invalid")


async def test_an_announcement_is_heard_with_its_records_and_withdrawn_by_its_goodbye() -> None:
    kind = service_type()
    with watching(kind) as watcher:
        announcement = Announcement("127.0.0.1", 8711, api_key_required=True, service_type=kind)
        await announcement.start()
        try:
            info = await asyncio.to_thread(watcher.wait_for_port, kind, 8711)
            assert info.name == announcement.name
            assert info.parsed_addresses() == ["127.0.0.1"]
            assert info.properties == {
                b"v": b"1",
                b"auth": b"bearer",
                b"id": announcement.instance_id.encode(),
            }
            assert announcement.instance_id in own_ids
        finally:
            await announcement.stop()
        gone = await asyncio.to_thread(
            watcher.wait_for, ServiceStateChange.Removed, lambda n: n == info.name, 10.0
        )
    assert gone == announcement.name
    assert announcement.instance_id not in own_ids
    await announcement.stop()  # twice is harmless


async def test_an_announcement_started_until_an_event_is_withdrawn_when_it_is_set() -> None:
    """``kensho up`` withdraws at the start of its drain, not after it."""
    kind = service_type()
    draining = asyncio.Event()
    with watching(kind) as watcher:
        announcement = Announcement("127.0.0.1", 8714, api_key_required=False, service_type=kind)
        announcement.start_soon(until=draining)
        try:
            info = await asyncio.to_thread(watcher.wait_for_port, kind, 8714)
            draining.set()
            await asyncio.to_thread(
                watcher.wait_for, ServiceStateChange.Removed, lambda n: n == info.name, 10.0
            )
        finally:
            await announcement.stop()  # the usual stop afterwards: waits for the same close
    assert announcement.instance_id not in own_ids


async def test_a_process_hears_its_own_announcement_but_never_asks_itself() -> None:
    kind = service_type()
    announcement = Announcement("127.0.0.1", 8712, api_key_required=False, service_type=kind)
    await announcement.start()
    try:
        heard = await ZeroconfBrowser(service_type=kind).browse(DEFAULT_DISCOVERY_TIMEOUT)
        assert [ad.url for ad in heard] == ["peer+http://127.0.0.1:8712"]
        peers = MdnsPeers(ZeroconfBrowser(service_type=kind))
        assert await peers.discover() == []
    finally:
        await announcement.stop()
    await peers.aclose()


async def test_stopping_before_the_registration_ran_cancels_it_and_claims_nothing() -> None:
    announcement = Announcement("127.0.0.1", 8713, api_key_required=False)
    announcement.start_soon()
    await announcement.stop()  # a start-up that fails at once stops it like this
    assert announcement.instance_id not in own_ids
    await announcement.stop()
