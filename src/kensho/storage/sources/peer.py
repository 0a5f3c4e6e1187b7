"""Another Kensho store on the site, asked for chunks by SHA-256 (``peer+http://HOST:PORT``).

A peer (``kensho up`` or ``kensho share``) serves the verified chunks of its store
at ``GET /v1/kensho/chunks/{sha256}`` (:mod:`kensho.server._chunks`). Content
addressing is what makes it useful: a peer on another release still holds every
chunk the two releases share, whatever the files are called, as in desync's chunk
stores and Dragonfly's pieces.

The source needs the chunk list of the file it is asked for, so the manager tells
it the manifest a run builds against (:meth:`PeerSource.know`); a byte range must
then cover whole chunks of that file, which is all the build layer ever asks.

A peer is a neighbour, not an authority, so it gets no second chance:

- a chunk it does not have: ``404``, this file goes to the next source at once, and
  the peer stays in the run (one short request is all it cost);
- wrong bytes, a wrong ``Content-Length``, a body longer than the chunk, a body cut
  short, a connection that drops, a read that times out, a rate below the minimum
  (slow-loris): the peer is distrusted for the rest of the run and the next source
  (the origin) fills in. Every chunk is hashed here before its last piece is handed
  on, so a wrong chunk never completes in the partial file; the build layer hashes
  what it writes as always, on its own.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

from kensho.errors import DownloadError, SourceError
from kensho.storage.manifest import Chunk, FileEntry, Manifest
from kensho.storage.sources._base import Sink, SourceUnreachableError
from kensho.storage.sources._health import (
    SYSTEM_CLOCK,
    Abandonment,
    FirstAnswer,
    MonotonicClock,
    RateGuard,
    TransferTooSlowError,
)

__all__ = ["CHUNK_ROUTE", "PEER_API_KEY_ENV", "PeerSource"]

#: Where a peer serves a chunk: ``CHUNK_ROUTE.format(sha256=...)``.
CHUNK_ROUTE = "/v1/kensho/chunks/{sha256}"
#: The Bearer token sent to peers started with an API key.
PEER_API_KEY_ENV = "KENSHO_PEER_API_KEY"


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every peer of the process.

    Why: each httpx client would load the system's CA bundle again (measured: 0.16 s
    on the event loop each), and a store lists many peers; a fleet benchmark of eight
    stores spent 9 of its 15 s there.
    """
    return httpx.create_ssl_context()  # the same trust as every other httpx client


class _Lie(Exception):
    """The peer answered something a correct peer never does."""


class PeerSource:
    """A Kensho peer at ``url`` (``peer+http://HOST:PORT`` or ``peer+https://``).

    ``api_key`` defaults to ``$KENSHO_PEER_API_KEY``. Timeouts are short: a peer is
    on the local network, and the origin is always behind it. ``clock`` times the
    minimum rate and the abandonment (inject a virtual one in tests).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        min_rate: float = 16 * 1024,
        rate_window: float = 10.0,
        clock: MonotonicClock = SYSTEM_CLOCK,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in {"peer+http", "peer+https"} or not parts.hostname:
            raise SourceError(f"{url!r} is not a peer URL: use peer+http://HOST:PORT")
        if parts.username or parts.password:
            raise SourceError(
                f"put no credentials in the peer URL {parts.hostname}; set {PEER_API_KEY_ENV}"
            )
        self.base_url = f"{scheme.removeprefix('peer+')}://{parts.netloc}{parts.path.rstrip('/')}"
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.clock = clock
        self._name = f"peer+{self.base_url}"
        self._abandonment = Abandonment(self._name, clock)
        self._first = FirstAnswer()
        self._files: dict[str, FileEntry] = {}
        key = api_key if api_key is not None else os.environ.get(PEER_API_KEY_ENV)
        self._client = httpx.AsyncClient(
            verify=_tls(),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            transport=transport,
            headers={
                "Accept-Encoding": "identity",
                **({"Authorization": f"Bearer {key}"} if key else {}),
            },
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def abandoned(self) -> str | None:
        """Why the peer is skipped for the rest of the run, or ``None`` if it is not."""
        return self._abandonment.reason

    def know(self, manifest: Manifest) -> None:
        """Take the chunk lists of ``manifest``, the release the run builds."""
        self._files = {entry.path: entry for entry in manifest.files}

    async def aclose(self) -> None:
        await self._client.aclose()

    def chunks_for(self, path: str, offset: int, length: int, file_size: int) -> Sequence[Chunk]:
        """The chunks of ``path`` that exactly cover the range; ``SourceError`` if none do."""
        entry = self._files.get(path)
        if entry is None or entry.size != file_size:
            raise SourceError(
                f"{self._name} serves chunks by hash, and {path} is not in the manifest "
                "this run builds"
            )
        chunks = entry.chunks
        first = bisect.bisect_left(chunks, offset, key=lambda c: c.offset)
        last = bisect.bisect_left(chunks, offset + length, key=lambda c: c.end)
        if (
            length <= 0
            or first >= len(chunks)
            or last >= len(chunks)
            or chunks[first].offset != offset
            or chunks[last].end != offset + length
        ):
            raise SourceError(
                f"{self._name} serves whole chunks only; bytes {offset}-{offset + length - 1} "
                f"of {path} are not a run of chunks"
            )
        return chunks[first : last + 1]

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        chunks = self.chunks_for(path, offset, length, file_size)
        probe = await self._first.admit(self._abandonment)
        try:
            for chunk in chunks:
                await self._chunk(chunk, sink)
        finally:
            if probe:
                self._first.done()

    async def _chunk(self, chunk: Chunk, sink: Sink) -> None:
        url = self.base_url + CHUNK_ROUTE.format(sha256=chunk.sha256)
        rate = RateGuard(self.min_rate, self.rate_window, self.clock)
        try:
            rate.start()
            try:
                async with self._client.stream("GET", url) as resp:
                    self._check_response(resp, chunk)
                    await self._body(resp, chunk, rate, sink)
            finally:
                rate.stop()
        except (_Lie, TransferTooSlowError, httpx.HTTPError) as exc:
            raise self._distrust(self._explain(exc, chunk.sha256[:12])) from exc

    def _explain(self, exc: Exception, short: str) -> SourceError:
        """The error that ends the peer's turn in this run, for ``exc``."""
        if isinstance(exc, _Lie):
            return DownloadError(f"{self._name} {exc}")
        if isinstance(exc, TransferTooSlowError):
            return DownloadError(f"{self._name} {exc} for chunk {short} (slow-loris)")
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return SourceUnreachableError(f"cannot connect to peer {self.base_url}: {exc}")
        if isinstance(exc, httpx.TimeoutException):
            return DownloadError(f"{self._name} stopped sending chunk {short} (timed out)")
        return DownloadError(f"{self._name} broke off chunk {short}: {exc}")

    def _distrust(self, error: SourceError) -> SourceError:
        self._first.reset()
        return self._abandonment.abandon(error, for_seconds=math.inf)

    def _check_response(self, resp: httpx.Response, chunk: Chunk) -> None:
        status = resp.status_code
        short = chunk.sha256[:12]
        if status == 404:
            self._first.answered()
            raise SourceError(f"{self._name} does not hold chunk {short} (HTTP 404)")
        if status == 429:
            self._first.answered()
            raise SourceError(
                f"{self._name} is busy (HTTP 429, rate limit); asking the next source"
            )
        if status in {401, 403}:
            raise self._distrust(
                SourceError(
                    f"{self._name} refused the request (HTTP {status}): set {PEER_API_KEY_ENV} "
                    "to the peer's API key"
                )
            )
        if status != 200:
            raise _Lie(f"answered HTTP {status} for chunk {short}; expected 200 or 404")
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared != str(chunk.size):
            raise _Lie(f"declared {declared} bytes for chunk {short}, which has {chunk.size} bytes")

    async def _body(self, resp: httpx.Response, chunk: Chunk, rate: RateGuard, sink: Sink) -> None:
        """Stream the chunk to ``sink``, hashing it; its last piece only once it matched."""
        digest = hashlib.sha256()
        got = 0
        held: bytes | None = None
        short = chunk.sha256[:12]
        async for data in resp.aiter_raw():
            rate.feed(len(data))
            got += len(data)
            if got > chunk.size:
                raise _Lie(f"sent more than the {chunk.size} bytes of chunk {short}")
            digest.update(data)
            if held is not None:
                with rate.paused():
                    await sink(held)
            held = data
        if got < chunk.size:
            raise _Lie(f"ended chunk {short} at byte {got} of {chunk.size}")
        if digest.hexdigest() != chunk.sha256:
            raise _Lie(f"sent wrong bytes for chunk {short}")
        self._first.answered()  # a peer proves itself with one good chunk, then goes parallel
        if held is not None:
            with rate.paused():
                await sink(held)
