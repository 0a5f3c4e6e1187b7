"""An HTTP(S) server holding the files under a base URL at their manifest paths.

Byte ranges are asked for with ``Range``; a server that ignores it and answers 200
with the whole file is handled by skipping to the offset. Transient failures
(connection errors, timeouts, 408/425/429/5xx) are retried with exponential backoff
and jitter (stamina), resuming at the last byte that got through; nothing else is
retried.

What a source costs a run is bounded (see :mod:`kensho.storage.sources._health`):

- a ``Retry-After`` up to 60 s is waited for; a longer one means "leave me alone":
  the source is abandoned at once, without waiting, until that time has passed;
- a transfer slower than ``min_rate`` bytes/s over a ``rate_window`` is abandoned
  (slow retrieval), however long each single read takes;
- a source that timed out, could not be connected to, crawled, or ran out of retries
  is abandoned for the rest of the run: later files skip it without a request.

Failures that concern one file only (404, another size, a body cut short) do not
abandon the source.

Plain ``http://`` bodies are read by worker threads (:mod:`._direct`), up to 1 MiB per
read straight from the socket, which costs a fraction of the CPU of streaming them
through httpx; HTTPS, proxies and injected transports go through httpx. Both paths
share every check and rule above.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import stamina

from kensho.errors import DownloadError, SourceError
from kensho.storage.sources._base import PIECE, Sink, SourceUnreachableError, size_mismatch
from kensho.storage.sources._channel import CHANNEL_FILE, ChannelAnswer, ChannelTag, too_large
from kensho.storage.sources._direct import DirectPool, NotDirect, direct_capable
from kensho.storage.sources._health import (
    SYSTEM_CLOCK,
    Abandonment,
    FirstAnswer,
    MonotonicClock,
    RateGuard,
    TransferTooSlowError,
)
from kensho.telemetry import get_logger

__all__ = ["DEFAULT_MIN_RATE", "DEFAULT_RATE_WINDOW", "MAX_RETRY_AFTER", "HttpSource"]

_log = get_logger("storage.source")

#: The longest ``Retry-After`` a run waits for; a longer one abandons the source.
MAX_RETRY_AFTER = 60.0
#: Bytes/s a transfer must average over each window (``storage.source_min_rate``).
DEFAULT_MIN_RATE = 16 * 1024
#: Seconds of transfer per judged window (``storage.source_rate_window``).
DEFAULT_RATE_WINDOW = 30.0

_MAX_REDIRECTS = 5
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _TransientStatus(Exception):
    """A "come back soon" answer: retried, after ``retry_after`` seconds if given."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class _LeaveAlone(Exception):
    """A "come back later" answer with a ``Retry-After`` longer than a run waits."""

    def __init__(self, status: int, retry_after: float) -> None:
        super().__init__(f"HTTP {status}, Retry-After {retry_after:g} s")
        self.status = status
        self.retry_after = retry_after


class _Truncated(Exception):
    """The body ended before the requested range did; resume from where it stopped."""


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay or HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true: hostile input
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _read_limited(resp: httpx.Response, url: str, max_bytes: int) -> bytes:
    """The body of ``resp``, refused once it passes ``max_bytes`` (declared or sent)."""
    declared = resp.headers.get("Content-Length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(url, max_bytes)
    body = bytearray()
    async for data in resp.aiter_raw():
        body += data
        if len(body) > max_bytes:
            raise too_large(url, max_bytes)
    return bytes(body)


def _retry_hook(exc: Exception) -> bool | float:
    """Retry only what may succeed next time; honour a short ``Retry-After``."""
    if isinstance(exc, _TransientStatus):
        return exc.retry_after if exc.retry_after is not None else True
    return isinstance(exc, httpx.TransportError | _Truncated)


def _client_headers(headers: Mapping[str, str]) -> httpx.Headers:
    """The headers an httpx client made with ``headers`` sends: httpx's defaults
    (``User-Agent``, ``Accept``, ...) with ``headers`` over them, so the thread path
    sends what httpx would. The client made to learn them has a do-nothing transport
    and ignores the environment: no TLS context, no proxy, nothing to close."""
    return httpx.AsyncClient(
        headers=headers, transport=httpx.AsyncBaseTransport(), trust_env=False
    ).headers


@dataclass(slots=True)
class _Transfer:
    """One :meth:`HttpSource.fetch`: where it stands, across all its retries."""

    url: str
    pos: int
    end: int
    file_size: int
    sink: Sink
    rate: RateGuard


class HttpSource:
    """An HTTP(S) server holding the files under ``base_url`` at their manifest paths.

    Follows up to 5 redirects. ``attempts`` and ``retry_timeout`` bound the retries of
    one transfer; a long transfer that keeps delivering at ``min_rate`` or better gets
    a fresh budget after each failure. ``clock`` times the rate and abandonments
    (inject a virtual one in tests). :attr:`abandoned` says whether, and why, the
    source is skipped for the rest of the run.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        attempts: int = 6,
        retry_timeout: float = 120.0,
        wait_initial: float = 0.2,
        wait_max: float = 10.0,
        wait_jitter: float = 1.0,
        min_rate: float = DEFAULT_MIN_RATE,
        rate_window: float = DEFAULT_RATE_WINDOW,
        clock: MonotonicClock = SYSTEM_CLOCK,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if rate_window <= 0:
            raise ValueError(f"rate_window must be positive, got {rate_window}")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.attempts = attempts
        self.retry_timeout = retry_timeout
        self.wait_initial = wait_initial
        self.wait_max = wait_max
        self.wait_jitter = wait_jitter
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.clock = clock
        self._abandonment = Abandonment(self.base_url, clock)
        self._first = FirstAnswer()
        sent = {"Accept-Encoding": "identity", **(headers or {})}
        self._client_options: dict[str, Any] = {
            "follow_redirects": True,
            "max_redirects": _MAX_REDIRECTS,
            "timeout": httpx.Timeout(read_timeout, connect=connect_timeout),
            "transport": transport,
            "headers": sent,
        }
        self._httpx: httpx.AsyncClient | None = None
        self._direct = (
            DirectPool(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                headers=_client_headers(sent),
            )
            if transport is None
            else None
        )
        # Read from the environment once, as httpx reads its proxies when a client is
        # made: every URL of this source shares the base URL's scheme and host, and
        # looking the proxies up again per request cost a scan of os.environ per file.
        self._direct_ok = direct_capable(self.base_url)

    @property
    def _client(self) -> httpx.AsyncClient:
        """The httpx client (HTTPS, proxies, an injected transport, the release
        channel), made on first use.

        Why lazily: making one builds its TLS context from certifi's bundle, 30-70 ms
        of CPU per source, which a sync from a plain ``http://`` server (the thread
        path) never uses.
        """
        if self._httpx is None:
            self._httpx = httpx.AsyncClient(**self._client_options)
        return self._httpx

    @property
    def name(self) -> str:
        return self.base_url

    @property
    def abandoned(self) -> str | None:
        """Why the source is skipped for the rest of the run, or ``None`` if it is not."""
        return self._abandonment.reason

    def url_for(self, path: str) -> str:
        return self.base_url + quote(path)

    async def aclose(self) -> None:
        if self._direct is not None:
            await asyncio.to_thread(self._direct.close)
        if self._httpx is not None:
            await self._httpx.aclose()

    async def fetch_release(self, tag: ChannelTag | None, max_bytes: int) -> ChannelAnswer:
        """``GET manifest.json`` at the base URL, conditional on ``tag`` (one request,
        no retry: the next poll is the retry). See :class:`~._channel.ReleaseFeed`."""
        url = self.url_for(CHANNEL_FILE)
        headers = {}
        if tag is not None and tag.etag:
            headers["If-None-Match"] = tag.etag
        if tag is not None and tag.modified:
            headers["If-Modified-Since"] = tag.modified
        try:
            async with self._client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 304 and tag is not None:
                    return ChannelAnswer(None, tag)
                if resp.status_code == 404:
                    raise SourceError(f"{url} was not found: this source publishes no release")
                if resp.status_code != 200:
                    raise SourceError(f"{url} answered HTTP {resp.status_code}; expected 200")
                data = await _read_limited(resp, url, max_bytes)
                new_tag = ChannelTag(resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
                return ChannelAnswer(data, new_tag)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise SourceUnreachableError(f"cannot connect to {url}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise DownloadError(f"download of {url} failed: {exc}") from exc

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        probe = await self._first.admit(self._abandonment)
        try:
            await self._transfer(path, offset, length, file_size, sink)
        finally:
            if probe:
                self._first.done()

    async def _transfer(
        self, path: str, offset: int, length: int, file_size: int, sink: Sink
    ) -> None:
        rate = RateGuard(self.min_rate, self.rate_window, self.clock)
        t = _Transfer(self.url_for(path), offset, offset + length, file_size, sink, rate)
        try:
            await self._resuming(t)
        except (_TransientStatus, _LeaveAlone, TransferTooSlowError, _Truncated) as exc:
            raise self._failed(t.url, exc) from exc
        except httpx.HTTPError as exc:
            raise self._failed(t.url, exc) from exc

    def _failed(self, url: str, exc: Exception) -> SourceError:
        """The error to raise for ``exc``; abandons the source if it is not fit now."""
        error, hold = self._explain(url, exc)
        if hold is None:
            return error
        self._first.reset()
        return self._abandonment.abandon(error, for_seconds=hold)

    def _explain(self, url: str, exc: Exception) -> tuple[SourceError, float | None]:
        """What went wrong, and how long to leave the source alone (``None``: not at all)."""
        if isinstance(exc, _LeaveAlone):
            return SourceError(
                f"{url} answered HTTP {exc.status} asking to be left alone for "
                f"{exc.retry_after:g} s (Retry-After), longer than the "
                f"{MAX_RETRY_AFTER:g} s a run waits"
            ), exc.retry_after
        if isinstance(exc, _TransientStatus):
            return SourceError(
                f"{url} answered HTTP {exc.status} {self.attempts} times; the server is "
                "overloaded or down, try again later or add another --source"
            ), math.inf
        if isinstance(exc, TransferTooSlowError):
            return DownloadError(
                f"{url} {exc} (storage.source_min_rate over storage.source_rate_window): "
                "too slow to finish, or stalling on purpose"
            ), math.inf
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return SourceUnreachableError(f"cannot connect to {url}: {exc}"), math.inf
        if isinstance(exc, httpx.TimeoutException):
            return DownloadError(
                f"{url} stopped sending data (timed out after {self.attempts} attempts)"
            ), math.inf
        hold = math.inf if isinstance(exc, httpx.TransportError) else None
        return DownloadError(f"download of {url} failed: {exc}"), hold

    async def _resuming(self, t: _Transfer) -> None:
        """Run the retries; a budget spent while delivering at pace is renewed."""
        while True:
            budget_start, began = t.pos, self.clock.monotonic()
            try:
                await self._with_retries(t)
                return
            except (httpx.TransportError, _Truncated):
                # The budget bounds failures, not transfer time, but only for a source
                # that keeps pace: one byte per retry must not renew it forever.
                delivered = t.pos - budget_start
                seconds = self.clock.monotonic() - began
                if t.pos >= t.end or delivered <= 0 or delivered < self.min_rate * seconds:
                    raise
                _log.info("download resumed with a fresh retry budget", url=t.url, at=t.pos)

    async def _with_retries(self, t: _Transfer) -> None:
        async for attempt in stamina.retry_context(
            on=_retry_hook,
            attempts=self.attempts,
            timeout=self.retry_timeout,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_jitter=self.wait_jitter,
        ):
            with attempt:
                await self._attempt(t)

    async def _attempt(self, t: _Transfer) -> None:
        """One request; its time, from sending it to the body's end, counts for the rate."""
        t.rate.start()
        try:
            await self._request(t)
        except (httpx.TransportError, _Truncated):
            t.rate.stop()
            t.rate.check()  # a stall after a trickle is "too slow", not "retry"
            raise
        finally:
            t.rate.stop()

    async def _request(self, t: _Transfer) -> None:
        url = t.url
        if self._direct is not None and self._direct_ok:
            try:
                await self._request_direct(t, self._direct)
                return
            except NotDirect as moved:  # redirected to HTTPS or a proxied host
                url = moved.url
        await self._request_httpx(t, url)

    def _range_headers(self, t: _Transfer) -> dict[str, str]:
        whole = t.pos == 0 and t.end == t.file_size
        return {} if whole else {"Range": f"bytes={t.pos}-{t.end - 1}"}

    async def _request_httpx(self, t: _Transfer, url: str) -> None:
        start = t.pos
        async with self._client.stream("GET", url, headers=self._range_headers(t)) as resp:
            skip = self._check_response(t.url, resp.status_code, resp.headers, start, t.file_size)
            async for data in resp.aiter_raw():
                skip = await self._deliver(t, data, skip)
                if t.pos >= t.end:
                    return
        if t.pos < t.end:
            raise _Truncated(f"the body ended at byte {t.pos} of {t.end}")

    async def _request_direct(self, t: _Transfer, pool: DirectPool) -> None:
        start = t.pos
        exchange = await pool.open(t.url, self._range_headers(t), _MAX_REDIRECTS)
        try:
            skip = self._check_response(
                t.url, exchange.status, exchange.headers, start, t.file_size
            )
            while t.pos < t.end:
                data = await exchange.read(PIECE)
                if not data:
                    raise _Truncated(f"the body ended at byte {t.pos} of {t.end}")
                skip = await self._deliver(t, data, skip)
        finally:
            exchange.release()

    async def _deliver(self, t: _Transfer, data: bytes, skip: int) -> int:
        """Hand the part of ``data`` inside the range to the sink; the bytes still to skip."""
        t.rate.feed(len(data))  # skipped bytes count: the link is moving
        if skip:
            if len(data) <= skip:
                return skip - len(data)
            data = data[skip:]  # dropping what the 200 sent before our range
            skip = 0
        piece = data[: t.end - t.pos]  # never accept more than asked (tuf's "endless data")
        with t.rate.paused():
            await t.sink(piece)
        t.pos += len(piece)
        return skip

    def _check_response(
        self, url: str, status: int, headers: Mapping[str, str], start: int, file_size: int
    ) -> int:
        """Validate status and sizes before any byte is used; return bytes to skip."""
        if status in _TRANSIENT_STATUS:
            wait = _parse_retry_after(headers.get("Retry-After"))
            if wait is not None and wait > MAX_RETRY_AFTER:
                raise _LeaveAlone(status, wait)
            raise _TransientStatus(status, wait)
        self._first.answered()
        if status == 404:
            raise SourceError(f"{url} was not found on the server (HTTP 404)")
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                raise DownloadError(f"{url} answered a different byte range than asked for")
            if match.group(3) != "*" and int(match.group(3)) != file_size:
                raise size_mismatch(url, int(match.group(3)), file_size)
            return 0
        if status == 200:
            length = headers.get("Content-Length")
            if (
                length is not None
                and length.isascii()
                and length.isdigit()
                and int(length) != file_size
            ):
                raise size_mismatch(url, int(length), file_size)
            return start  # the server ignored Range: skip to our offset
        raise SourceError(f"{url} answered HTTP {status}; expected 200 or 206")
