"""Where repaired bytes come from: mirror folders, HTTP(S) servers, memory (tests).

Every source implements one call, :meth:`Source.fetch`: deliver exactly ``length``
bytes of ``path`` starting at ``offset`` to an async ``sink``, in order, or raise.
The manager hashes and writes what the sink receives, so a source never needs to be
trusted: it only moves bytes. Errors are split by what the manager should do next:

::

    SourceError                  this source cannot deliver this file: try the next one
    ├── SourceUnreachableError   cannot reach the source at all (offline, no such folder)
    └── DownloadError            the transfer broke or offered the wrong size

Exceptions raised by the sink (a hash mismatch, ``ENOSPC``) pass through untouched
and are never retried here: they are the manager's business.

Why the sink instead of an async iterator: the HTTP source retries in a loop that
resumes at the last delivered byte, and a ``yield`` inside a retry context would hand
the consumer's own exceptions to the retry machinery.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlsplit

import httpx
import stamina

from kensho.errors import DownloadError, SourceError
from kensho.telemetry import get_logger

__all__ = [
    "HttpSource",
    "MemorySource",
    "MirrorSource",
    "Sink",
    "Source",
    "SourceUnreachableError",
    "source_from_string",
]

_log = get_logger("storage.source")

#: Receives the next bytes of a transfer, in order.
Sink = Callable[[bytes], Awaitable[None]]

_PIECE = 1 << 20
_MAX_RETRY_AFTER = 60.0
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class SourceUnreachableError(SourceError):
    """The source cannot be reached at all (no network, server down, folder absent)."""


@runtime_checkable
class Source(Protocol):
    """Something that can deliver byte ranges of the files in a manifest."""

    @property
    def name(self) -> str:
        """A short label for events and errors (a URL or a folder)."""
        ...

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        """Feed ``length`` bytes of ``path`` from ``offset`` to ``sink``, or raise.

        ``file_size`` is the size the manifest declares; a source whose copy has a
        different size refuses before sending anything.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


def _size_mismatch(where: str, offered: int, declared: int) -> DownloadError:
    return DownloadError(
        f"{where} offers {offered} bytes but the manifest declares {declared}; "
        "the source holds another version of this file (update the mirror or the manifest)"
    )


class MirrorSource:
    """A folder holding the files at their manifest paths (a USB stick, an NFS share).

    ``location`` is a path or a ``file://`` URL. Reads never leave the folder, even
    through symlinks inside it.
    """

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        if text.startswith("file://"):
            text = unquote(urlsplit(text).path)
        self.root = Path(text)

    @property
    def name(self) -> str:
        return str(self.root)

    def _open(self, path: str, file_size: int) -> int:
        if not self.root.is_dir():
            raise SourceUnreachableError(
                f"mirror folder {self.root} is not there (is the drive mounted?)"
            )
        target = self.root / path
        real_root = self.root.resolve()
        real = target.resolve()
        if not real.is_relative_to(real_root):
            raise SourceError(f"{target} leads outside the mirror {self.root}; refusing to read")
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags)  # O_NONBLOCK: a FIFO planted there cannot hang us
        except FileNotFoundError:
            raise SourceError(f"{path} is not in the mirror {self.root}") from None
        except OSError as exc:
            raise SourceError(f"cannot read {target}: {exc.strerror}") from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise SourceError(f"{target} in the mirror is not a regular file")
        size = info.st_size
        if size != file_size:
            os.close(fd)
            raise _size_mismatch(str(target), size, file_size)
        return fd

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        fd = await asyncio.to_thread(self._open, path, file_size)
        try:
            pos, end = offset, offset + length
            while pos < end:
                try:
                    piece = await asyncio.to_thread(os.pread, fd, min(_PIECE, end - pos), pos)
                except OSError as exc:  # a failing USB stick, a stale NFS handle
                    raise SourceError(
                        f"cannot read {self.root / path} at byte {pos}: {exc.strerror or exc}"
                    ) from exc
                if not piece:
                    raise DownloadError(f"{self.root / path} ended early at byte {pos}")
                pos += len(piece)
                await sink(piece)
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        return None


class _TransientStatus(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class _Truncated(Exception):
    """The body ended before the requested range did; resume from where it stopped."""


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true: hostile input
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - time.time(), _MAX_RETRY_AFTER))


def _retry_hook(exc: Exception) -> bool | float:
    """Retry only what may succeed next time; honour ``Retry-After`` (capped at 60 s)."""
    if isinstance(exc, _TransientStatus):
        return exc.retry_after if exc.retry_after is not None else True
    return isinstance(exc, httpx.TransportError | _Truncated)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpSource:
    """An HTTP(S) server holding the files under ``base_url`` at their manifest paths.

    Asks for byte ranges; a server that ignores ``Range`` and answers 200 with the
    whole file is handled by skipping to the offset. Follows up to 5 redirects.
    Transient failures (connection errors, timeouts, 408/425/429/5xx) are retried
    with exponential backoff and jitter (stamina), resuming at the last byte that got
    through; ``Retry-After`` is honoured up to 60 s. Nothing else is retried.
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
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.attempts = attempts
        self.retry_timeout = retry_timeout
        self.wait_initial = wait_initial
        self.wait_max = wait_max
        self.wait_jitter = wait_jitter
        self._client = httpx.AsyncClient(
            follow_redirects=True,
            max_redirects=5,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            transport=transport,
            headers={"Accept-Encoding": "identity", **(headers or {})},
        )

    @property
    def name(self) -> str:
        return self.base_url

    def url_for(self, path: str) -> str:
        return self.base_url + quote(path)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        url = self.url_for(path)
        end = offset + length
        pos = [offset]
        try:
            while True:
                budget_start = pos[0]
                try:
                    await self._fetch_with_retries(url, pos, end, file_size, sink)
                    return
                except (httpx.TransportError, _Truncated):
                    # A long range that kept delivering before it failed gets a fresh
                    # retry budget: the budget bounds failures, not transfer time.
                    if pos[0] == budget_start or pos[0] >= end:
                        raise
                    _log.info("download resumed with a fresh retry budget", url=url, at=pos[0])
        except _TransientStatus as exc:
            raise SourceError(
                f"{url} answered HTTP {exc.status} {self.attempts} times; the server is "
                "overloaded or down, try again later or add another --source"
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise SourceUnreachableError(f"cannot connect to {url}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise DownloadError(
                f"{url} stopped sending data (timed out after {self.attempts} attempts)"
            ) from exc
        except (httpx.HTTPError, _Truncated) as exc:
            raise DownloadError(f"download of {url} failed: {exc}") from exc

    async def _fetch_with_retries(
        self, url: str, pos: list[int], end: int, file_size: int, sink: Sink
    ) -> None:
        async for attempt in stamina.retry_context(
            on=_retry_hook,
            attempts=self.attempts,
            timeout=self.retry_timeout,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_jitter=self.wait_jitter,
        ):
            with attempt:
                await self._fetch_once(url, pos, end, file_size, sink)

    async def _fetch_once(
        self, url: str, pos: list[int], end: int, file_size: int, sink: Sink
    ) -> None:
        start = pos[0]
        headers = {} if (start == 0 and end == file_size) else {"Range": f"bytes={start}-{end - 1}"}
        async with self._client.stream("GET", url, headers=headers) as resp:
            skip = self._check_response(url, resp, start, file_size)
            async for data in resp.aiter_raw():
                if skip:
                    if len(data) <= skip:
                        skip -= len(data)
                        continue
                    data = data[skip:]  # noqa: PLW2901 - dropping what the 200 sent before our range
                    skip = 0
                want = end - pos[0]
                if len(data) >= want:
                    # Cap: never accept more than was asked (tuf's "endless data").
                    await sink(data[:want])
                    pos[0] = end
                    return
                await sink(data)
                pos[0] += len(data)
        if pos[0] < end:
            raise _Truncated(f"the body ended at byte {pos[0]} of {end}")

    @staticmethod
    def _check_response(url: str, resp: httpx.Response, start: int, file_size: int) -> int:
        """Validate status and sizes before any byte is used; return bytes to skip."""
        status = resp.status_code
        if status in _TRANSIENT_STATUS:
            raise _TransientStatus(status, _parse_retry_after(resp.headers.get("Retry-After")))
        if status == 404:
            raise SourceError(f"{url} was not found on the server (HTTP 404)")
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                raise DownloadError(f"{url} answered a different byte range than asked for")
            if match.group(3) != "*" and int(match.group(3)) != file_size:
                raise _size_mismatch(url, int(match.group(3)), file_size)
            return 0
        if status == 200:
            length = resp.headers.get("Content-Length")
            if (
                length is not None
                and length.isascii()
                and length.isdigit()
                and int(length) != file_size
            ):
                raise _size_mismatch(url, int(length), file_size)
            return start  # the server ignored Range: skip to our offset
        raise SourceError(f"{url} answered HTTP {status}; expected 200 or 206")


class MemorySource:
    """Files held in memory, for tests (like httpx's ``MockTransport``).

    Records every request in :attr:`requests` and counts :attr:`bytes_served`.
    ``handler(path, offset, length)`` may replace the lookup to inject failures:
    return the bytes to send, or raise.
    """

    def __init__(
        self,
        files: Mapping[str, bytes] | None = None,
        *,
        handler: Callable[[str, int, int], bytes] | None = None,
        name: str = "memory",
    ) -> None:
        self.files = dict(files or {})
        self.handler = handler
        self.requests: list[tuple[str, int, int]] = []
        self.bytes_served = 0
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        self.requests.append((path, offset, length))
        if self.handler is not None:
            data = self.handler(path, offset, length)
        else:
            whole = self.files.get(path)
            if whole is None:
                raise SourceError(f"{path} is not in {self._name}")
            if len(whole) != file_size:
                raise _size_mismatch(f"{self._name}:{path}", len(whole), file_size)
            data = whole[offset : offset + length]
        for i in range(0, len(data), _PIECE):
            piece = data[i : i + _PIECE]
            self.bytes_served += len(piece)
            await sink(piece)
        if len(data) < length:
            raise DownloadError(f"{self._name}:{path} ended early")

    async def aclose(self) -> None:
        return None


def source_from_string(spec: str, **http_options: float) -> Source:
    """``http(s)://...`` gives an :class:`HttpSource`; a path or ``file://`` a mirror."""
    scheme = urlsplit(spec).scheme.lower()
    if scheme in {"http", "https"}:
        return HttpSource(spec, **http_options)  # type: ignore[arg-type]
    if scheme in {"", "file"} or len(scheme) == 1:  # one letter: a Windows drive
        return MirrorSource(spec)
    raise SourceError(f"unsupported source {spec!r}: use a folder, file://, http:// or https://")
