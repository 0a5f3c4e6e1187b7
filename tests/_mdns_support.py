"""mDNS for the tests: real DNS-SD announcements on the loopback interface.

:func:`announced` registers a service the way another device's ``kensho share
--announce`` does (python-zeroconf's own thread and sockets, TXT from
:func:`~kensho.storage.sources.mdns.txt_record`), so this process's browses hear a
peer that is not its own. :func:`service_type` gives each test a DNS-SD type of its
own, so tests running side by side never hear each other's announcements.
:class:`Watcher` follows a type and records every service added or removed.
"""

from __future__ import annotations

import queue
import secrets
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from zeroconf import (
    DNSQuestionType,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from kensho.storage.sources.mdns import txt_record

LOOPBACK = ["127.0.0.1"]


def service_type() -> str:
    """A DNS-SD service type no other test uses."""
    return f"_kt-{secrets.token_hex(5)}._tcp.local."


@contextmanager
def announced(
    port: int,
    kind: str,
    *,
    auth: bool = False,
    properties: Mapping[str, str] | None = None,
    address: str = "127.0.0.1",
) -> Iterator[ServiceInfo]:
    """A chunk server at ``address``:``port`` announced as another device would.

    The registration runs on a thread of its own (zeroconf's blocking API refuses an
    event loop's thread), so async tests can announce too.
    """
    instance = secrets.token_hex(8)
    info = ServiceInfo(
        kind,
        f"other-{instance}.{kind}",
        port=port,
        parsed_addresses=[address],
        properties=dict(properties or txt_record(auth=auth, instance_id=instance)),
        server=f"other-{instance}.local.",
    )
    with ThreadPoolExecutor(1, thread_name_prefix="mdns-peer") as pool:
        zc = pool.submit(Zeroconf, interfaces=LOOPBACK, ip_version=IPVersion.V4Only).result()
        try:
            # The name is random: no probing for a conflict (the product's announcements do).
            pool.submit(zc.register_service, info, cooperating_responders=True).result()
            yield info
        finally:
            pool.submit(zc.close).result()  # unregisters (goodbyes) and closes


@dataclass
class Watcher:
    """Every (change, name) seen for one service type, in order."""

    events: queue.Queue[tuple[ServiceStateChange, str]] = field(default_factory=queue.Queue)
    zc: Zeroconf | None = None

    def wait_for(
        self,
        change: ServiceStateChange,
        match: Callable[[str], bool] = lambda name: True,
        timeout: float = 20.0,
    ) -> str:
        """Block until a service ``match`` accepts has ``change``; its name."""
        while True:
            try:
                seen, name = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no service {change.name} in {timeout:g} s") from None
            if seen is change and match(name):
                return name

    def wait_for_port(self, kind: str, port: int, timeout: float = 20.0) -> ServiceInfo:
        """Block until a service announcing ``port`` is added; its records."""

        def on_port(name: str) -> bool:
            info = self.lookup(kind, name)
            return info is not None and info.port == port

        return self.info(kind, self.wait_for(ServiceStateChange.Added, on_port, timeout))

    def lookup(self, kind: str, name: str) -> ServiceInfo | None:
        """The records of ``name``, or ``None`` if it is gone (another test's, withdrawn)."""
        assert self.zc is not None
        return self.zc.get_service_info(kind, name, timeout=3000, question_type=DNSQuestionType.QM)

    def info(self, kind: str, name: str) -> ServiceInfo:
        info = self.lookup(kind, name)
        assert info is not None, name
        return info


@contextmanager
def watching(kind: str) -> Iterator[Watcher]:
    """Follow ``kind`` on every interface (loopback included) until the block ends.

    zeroconf runs on a thread of its own; from an async test, call the watcher's
    blocking methods through ``asyncio.to_thread``.
    """
    watcher = Watcher()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        watcher.events.put((state_change, name))

    with ThreadPoolExecutor(1, thread_name_prefix="mdns-watch") as pool:
        watcher.zc = pool.submit(Zeroconf, ip_version=IPVersion.V4Only).result()
        # Multicast answers only: a unicast one may reach another process's socket.
        browser = ServiceBrowser(
            watcher.zc, kind, handlers=[on_change], question_type=DNSQuestionType.QM
        )
        try:
            yield watcher
        finally:
            browser.cancel()
            pool.submit(watcher.zc.close).result()
