"""Plain ``http://`` exchanges on worker threads: the fast body path of the HTTP source.

Why: streaming a body through httpx costs the event loop about 2 s of CPU per GB on
this project's machine (64 KiB reads, each through anyio, httpcore and h11, copied
three or four times), while the same bytes read from the socket by a thread cost
0.3 s. On a machine with few cores that CPU is what keeps a sync below ``curl``,
so for plain HTTP the bytes are read by :mod:`http.client` on a worker thread, up to
1 MiB per read straight from the socket, and only handed to the event loop (the
sink: hashing and writing) once per read.

Only the transport changes: :class:`~.http.HttpSource` still checks every status
and header, counts the rate, retries and abandons exactly as it does for httpx,
because every failure here is raised as the httpx exception it stands for
(``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``, ``ReadError``). HTTPS, a
proxy from the environment (``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) and an
injected transport stay on httpx, which honours its TLS settings and proxies.

A blocked read cannot be cancelled; cancelling shuts the socket down, which ends
the read at once, and waits for the thread before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = ["DirectExchange", "DirectPool", "NotDirect", "direct_capable"]

_T = TypeVar("_T")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_THREADS = 16


def direct_capable(url: str) -> bool:
    """Whether ``url`` may take the thread path: plain HTTP, no proxy configured for it."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    if "http" in proxies or "all" in proxies:
        return bool(urllib.request.proxy_bypass(parts.hostname))
    return True


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 80


def _target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class _Connection(http.client.HTTPConnection):
    """An ``HTTPConnection`` that remembers its socket.

    ``http.client`` drops ``sock`` as soon as a response says it closes the
    connection, while that response still reads from the socket; cancelling a read
    must reach it.
    """

    raw: socket.socket | None = None


class DirectExchange:
    """One request and its response on a connection of a :class:`DirectPool`."""

    def __init__(self, pool: DirectPool, conn: _Connection, url: str) -> None:
        self._pool = pool
        self._conn = conn
        self.url = url
        self.response: http.client.HTTPResponse | None = None
        self.headers: Mapping[str, str] = httpx.Headers()  # case-insensitive, like httpx's

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` body bytes, as soon as any arrived; ``b""`` at the end."""
        assert self.response is not None
        return await self._pool.run(self._conn, _read_some, self.response, limit)

    def release(self) -> None:
        """Give the connection back for reuse if its response was read to the end."""
        resp = self.response
        done = resp is not None and not resp.chunked and resp.length == 0 and not resp.will_close
        if done and resp is not None:
            resp.read()  # nothing left: marks the response closed, the connection idle
            self._pool.give_back(self._conn)
            return
        if resp is not None:
            resp.close()  # its file object holds the socket open until closed
        self._conn.close()


class DirectPool:
    """Keep-alive connections per origin and the threads that use them."""

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, headers: Mapping[str, str]
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.headers = dict(headers)
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._threads = ThreadPoolExecutor(_MAX_THREADS, thread_name_prefix="kensho-http")
        self._busy: set[_Connection] = set()

    async def open(self, url: str, headers: Mapping[str, str], redirects: int) -> DirectExchange:
        """Send ``GET url`` and read the response head, following up to ``redirects``.

        Raises the httpx exception a failure stands for, or ``httpx.TooManyRedirects``.
        """
        for _ in range(redirects + 1):
            exchange = await self._exchange(url, headers)
            location = exchange.headers.get("Location")
            if exchange.status not in _REDIRECTS or not location:
                return exchange
            exchange.release()
            url = urljoin(url, location)
            if not direct_capable(url):
                raise NotDirect(url)
        raise httpx.TooManyRedirects(f"more than {redirects} redirects from {url}")

    async def _exchange(self, url: str, headers: Mapping[str, str]) -> DirectExchange:
        origin = _origin(url)
        sent = {**self.headers, **headers}
        idle = self._idle.get(origin)
        if idle:  # a kept-alive connection the server may have closed meanwhile
            conn = idle.pop()
            try:
                return await self._send(conn, url, sent)
            except httpx.ReadError:
                pass  # retried once on a new connection, as httpcore does
        conn = _Connection(*origin, timeout=self.read_timeout)
        await self.run(conn, _connect, conn, self.connect_timeout, self.read_timeout)
        return await self._send(conn, url, sent)

    async def _send(self, conn: _Connection, url: str, headers: dict[str, str]) -> DirectExchange:
        exchange = DirectExchange(self, conn, url)
        try:
            exchange.response = await self.run(conn, _request, conn, _target(url), headers)
            exchange.headers = httpx.Headers(exchange.response.getheaders())
        except BaseException:
            conn.close()
            raise
        return exchange

    def give_back(self, conn: _Connection) -> None:
        host, port = conn.host, conn.port
        self._idle.setdefault((host, port), []).append(conn)

    async def run(self, conn: _Connection, func: Callable[..., _T], *args: object) -> _T:
        """``func(*args)`` on a worker thread; a cancellation first ends the I/O."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._threads, func, *args)
        self._busy.add(conn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            _shut(conn)
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            if not future.cancelled() and future.exception() is None:
                # The work finished before it saw the shutdown: a response it opened
                # holds the socket (its file object) and nobody else will close it.
                result = future.result()
                if isinstance(result, http.client.HTTPResponse):
                    result.close()
            raise
        finally:
            self._busy.discard(conn)

    def close(self) -> None:
        """Close every connection (ending blocked reads) and stop the threads."""
        for conn in [*self._busy, *(c for idle in self._idle.values() for c in idle)]:
            _shut(conn)
            conn.close()
        self._idle.clear()
        self._threads.shutdown(wait=True, cancel_futures=True)


class NotDirect(Exception):
    """A redirect to a URL the thread path does not serve (HTTPS, a proxied host)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def _shut(conn: _Connection) -> None:
    if conn.raw is not None:
        with contextlib.suppress(OSError):
            conn.raw.shutdown(socket.SHUT_RDWR)


def _connect(conn: _Connection, connect_timeout: float, read_timeout: float) -> None:
    try:
        sock = socket.create_connection((conn.host, conn.port), timeout=connect_timeout)
    except TimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "timed out while connecting") from exc
    except OSError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    sock.settimeout(read_timeout)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sock = conn.raw = sock


def _request(conn: _Connection, target: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    try:
        conn.request("GET", target, headers=headers)
        return conn.getresponse()
    except TimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc


def _read_some(resp: http.client.HTTPResponse, limit: int) -> bytes:
    try:
        return resp.read1(limit)
    except TimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc
