"""An object store bucket holding the files under a prefix: ``s3://``, ``gs://``, ``az://``.

Reads go through fsspec (s3fs for S3, gcsfs for Google Cloud Storage, adlfs for
Azure), the libraries their users already configure: the standard credentials
chain and environment apply as they would for ``aws s3 cp`` (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, config files,
instance roles). Byte ranges are ranged ``GET`` requests of ``part_size`` bytes,
``parallel`` of them in flight (as ``aws s3 cp`` does for large objects), handed to
the sink in order.

Retries are the client library's own (botocore's "standard" mode and s3fs's retry
of ``503 SlowDown``), bounded by ``attempts``. What is left is mapped onto the source
error tree, split like the HTTP source:

- the object is missing, or has another size than declared: this file fails here,
  the next source is asked, the source stays in the run;
- no such bucket, access denied, no credentials, still throttled after the retries,
  endpoint unreachable: every other file would fail the same way, so the source is
  abandoned for the rest of the run (:class:`~._health.Abandonment`).

The bucket publishes releases as ``manifest.json`` at the prefix root
(:meth:`ObjectStoreSource.fetch_release`): a poll is one ``HEAD`` request while the
object's ETag is the one of the last answer, and a poll's failure is mapped like a
fetch's but abandons nothing (the next poll is the retry, as for the HTTP source).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from kensho.errors import DownloadError, SourceError
from kensho.storage.sources._base import PIECE, Sink, SourceUnreachableError, size_mismatch
from kensho.storage.sources._channel import CHANNEL_FILE, ChannelAnswer, ChannelTag, too_large
from kensho.storage.sources._health import SYSTEM_CLOCK, Abandonment, FirstAnswer, MonotonicClock

__all__ = ["OBJECT_STORE_SCHEMES", "ObjectStoreSource"]

#: URL scheme -> (fsspec protocol, the package that implements it).
OBJECT_STORE_SCHEMES: Mapping[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"),
    "gs": ("gs", "gcsfs"),
    "gcs": ("gs", "gcsfs"),
    "az": ("az", "adlfs"),
    "abfs": ("abfs", "adlfs"),
}

#: Bytes per ranged GET. boto3's transfer manager uses 8 MiB; measured on moto, 16 MiB
#: parts cost fewer round trips for the same memory bound (``part_size * parallel``).
DEFAULT_PART_SIZE = 16 * 1024 * 1024
#: Ranged GETs in flight per transfer (at most 96 MiB held per transfer).
DEFAULT_PARALLEL = 6


class FileSystem(Protocol):
    """The part of an fsspec file system this source uses (blocking calls)."""

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]: ...

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes: ...


def _filesystem(
    protocol: str, package: str, attempts: int, timeout: float, options: Mapping[str, Any]
) -> FileSystem:
    """A fresh fsspec file system for ``protocol``; a clear error if its package is missing."""
    if importlib.util.find_spec(package) is None:
        raise SourceError(
            f"{protocol}:// sources need the {package} package, which is not installed: "
            f"pip install {package} (or kensho[s3] for S3)"
        )
    import fsspec

    kwargs: dict[str, Any] = {"skip_instance_cache": True, **options}
    if protocol == "s3" and "session" not in kwargs:
        kwargs["session"] = _s3_session(kwargs)
    if protocol == "s3":
        kwargs.setdefault(
            "config_kwargs",
            {
                "retries": {"max_attempts": attempts, "mode": "standard"},
                "connect_timeout": min(timeout, 10.0),
                "read_timeout": timeout,
            },
        )
    fs = fsspec.filesystem(protocol, **kwargs)
    if hasattr(fs, "retries"):  # s3fs's own retry of SlowDown and dropped connections
        fs.retries = attempts
    return fs  # type: ignore[no-any-return]


#: Session options s3fs hands to the ``AioSession`` it makes (its leftover keywords).
_SESSION_OPTIONS = ("profile", "session_vars", "event_hooks", "include_builtin_handlers")
_shared_loader: Any = None  # botocore's Loader, made once per process (lazily)
_loader_lock = threading.Lock()


def _botocore_loader() -> Any:
    """The process's one botocore data loader (service models, endpoints), made lazily.

    Why: each new botocore session parses the S3 service model and the endpoint
    rules again (a few hundred ms of CPU), while boto3 reuses its default session's
    loader, so every ``s3://`` source after the first paid for what boto3 had
    cached. The loader only reads botocore's bundled, immutable data files (its
    cache is per file), so sharing it shares nothing a run may change.
    """
    global _shared_loader  # noqa: PLW0603 - one immutable-data cache per process
    with _loader_lock:
        if _shared_loader is None:
            from botocore.loaders import create_loader

            _shared_loader = create_loader()
        return _shared_loader


def _s3_session(options: Mapping[str, Any]) -> Any:
    """A new aiobotocore session, as s3fs would make it, on the shared loader.

    Only the loader is shared: credentials, profile, region and endpoint are read
    by this new session from the environment and config files as they are now
    (the standard chain, every time), as they were when s3fs made its own session.
    A ``data_path`` set in the AWS config (extra models) keeps a loader of its own.
    """
    from aiobotocore.session import AioSession

    session = AioSession(**{k: options[k] for k in _SESSION_OPTIONS if k in options})
    if session.get_config_variable("data_path") is None:
        session.register_component("data_loader", _botocore_loader())
    return session


class ObjectStoreSource:
    """The files of a manifest at ``<prefix>/<path>`` in an object store bucket.

    ``url`` is ``s3://bucket/prefix`` (or ``gs://``, ``az://``). ``filesystem``
    replaces the fsspec file system (tests); ``storage_options`` are passed to it
    (``{"anon": True}`` for a public bucket, ``endpoint_url``, ...). :attr:`abandoned`
    says whether, and why, the source is skipped for the rest of the run.
    """

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 6,
        timeout: float = 30.0,
        part_size: int = DEFAULT_PART_SIZE,
        parallel: int = DEFAULT_PARALLEL,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: FileSystem | None = None,
        clock: MonotonicClock = SYSTEM_CLOCK,
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in OBJECT_STORE_SCHEMES:
            raise SourceError(f"{url!r} is not an object store URL (s3://, gs://, az://)")
        if not parts.netloc:
            raise SourceError(f"{url!r} names no bucket: use {scheme}://BUCKET/PREFIX")
        if part_size < 1 or parallel < 1:
            raise ValueError("part_size and parallel must be positive")
        self.url = url.rstrip("/")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.attempts = max(1, attempts)
        self.part_size = part_size
        self.parallel = parallel
        self._protocol, self._package = OBJECT_STORE_SCHEMES[scheme]
        self._timeout = timeout
        self._options = dict(storage_options or {})
        self._fs = filesystem
        self._sizes: dict[str, int] = {}
        self._abandonment = Abandonment(self.url, clock)
        self._first = FirstAnswer()

    @property
    def name(self) -> str:
        return self.url

    @property
    def abandoned(self) -> str | None:
        """Why the source is skipped for the rest of the run, or ``None`` if it is not."""
        return self._abandonment.reason

    def key_for(self, path: str) -> str:
        """The fsspec path (``bucket/prefix/path``) of a manifest path."""
        return "/".join(p for p in (self.bucket, self.prefix, path) if p)

    def _filesystem(self) -> FileSystem:
        if self._fs is None:
            self._fs = _filesystem(
                self._protocol, self._package, self.attempts, self._timeout, self._options
            )
        return self._fs

    async def aclose(self) -> None:
        return None

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        # Until the store answered once, one file at a time asks it: files repaired
        # together do not each pay for a missing bucket or denied access.
        probe = await self._first.admit(self._abandonment)
        try:
            key = self.key_for(path)
            size = await self._call(self._size, key)
            self._first.answered()
            if size != file_size:
                raise size_mismatch(f"{self._protocol}://{key}", size, file_size)
            await self._stream(key, offset, offset + length, sink)
        finally:
            if probe:
                self._first.done()

    async def fetch_release(self, tag: ChannelTag | None, max_bytes: int) -> ChannelAnswer:
        """``manifest.json`` at the prefix root, unless its ETag is still ``tag``'s.

        S3 answers a ``HEAD`` with the object's ETag and size, so an unchanged channel
        costs that one request and a manifest over ``max_bytes`` is refused before any
        byte of it is read (a ranged ``GET`` bounds the read if it grew in between).
        See :class:`~._channel.ReleaseFeed`.
        """
        key = self.key_for(CHANNEL_FILE)
        try:
            return await asyncio.to_thread(self._read_release, key, tag, max_bytes)
        except SourceError:
            raise
        except Exception as exc:
            raise self._release_error(key, exc) from exc

    def _read_release(self, key: str, tag: ChannelTag | None, max_bytes: int) -> ChannelAnswer:
        info = self._filesystem().info(key, refresh=True)  # a HEAD, never a cached listing
        now = _channel_tag(info)
        if tag is not None and now.etag is not None and tag.etag == now.etag:
            return ChannelAnswer(None, now)
        where = f"{self._protocol}://{key}"
        size = int(info.get("size") or 0)
        if size > max_bytes:
            raise too_large(where, max_bytes)
        data = self._filesystem().cat_file(key, start=0, end=max_bytes + 1) if size else b""
        if len(data) > max_bytes:
            raise too_large(where, max_bytes)
        return ChannelAnswer(data, now)

    def _release_error(self, key: str, exc: Exception) -> SourceError:
        """A poll's failure as a source error (the source stays in the run)."""
        error, _ = self._explain(key, exc)
        if isinstance(exc, FileNotFoundError) and "bucket" not in str(exc).lower():
            return SourceError(
                f"{self._protocol}://{key} is not in the bucket: this source publishes no release"
            )
        return error

    def _size(self, key: str) -> int:
        if key not in self._sizes:
            self._sizes[key] = int(self._filesystem().info(key)["size"])
        return self._sizes[key]

    async def _stream(self, key: str, start: int, end: int, sink: Sink) -> None:
        """Ranged GETs of ``part_size``, ``parallel`` in flight, fed to ``sink`` in order."""
        bounds = [
            (pos, min(pos + self.part_size, end)) for pos in range(start, end, self.part_size)
        ]
        pending: list[asyncio.Task[bytes]] = []
        try:
            for i in range(len(bounds)):
                while len(pending) < self.parallel and i + len(pending) < len(bounds):
                    lo, hi = bounds[i + len(pending)]
                    pending.append(asyncio.ensure_future(self._call(self._part, key, lo, hi)))
                data = await pending.pop(0)
                lo, hi = bounds[i]
                if len(data) != hi - lo:
                    raise DownloadError(
                        f"{self._protocol}://{key} sent {len(data)} bytes for the range "
                        f"{lo}-{hi - 1}; expected {hi - lo}"
                    )
                for at in range(0, len(data), PIECE):
                    await sink(data[at : at + PIECE])
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def _part(self, key: str, lo: int, hi: int) -> bytes:
        return self._filesystem().cat_file(key, start=lo, end=hi)

    async def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking fsspec call in a thread; its failures as source errors."""
        try:
            return await asyncio.to_thread(func, *args)
        except SourceError:
            raise
        except Exception as exc:
            error, abandon = self._explain(args[0] if args else "", exc)
            if not abandon:
                self._first.answered()  # a missing key is an answer about one file
                raise error from exc
            self._first.reset()
            raise self._abandonment.abandon(error, for_seconds=math.inf) from exc

    def _explain(self, key: str, exc: Exception) -> tuple[SourceError, bool]:
        """The source error for a client library's exception; whether to abandon."""
        where = f"{self._protocol}://{key}"
        if isinstance(exc, FileNotFoundError):
            if "bucket" in str(exc).lower():
                return SourceError(
                    f"the bucket {self.bucket!r} does not exist ({self.url}); check the "
                    "--source URL and the endpoint (AWS_ENDPOINT_URL)"
                ), True
            return SourceError(f"{where} is not in the bucket (no such key)"), False
        if isinstance(exc, PermissionError):
            return SourceError(
                f"access denied to {where}: check the credentials (AWS_PROFILE, "
                f"AWS_ACCESS_KEY_ID) and the bucket policy ({exc})"
            ), True
        if isinstance(exc, OSError) and exc.errno == errno.EBUSY:
            return SourceError(
                f"{where}: the object store kept throttling (503 SlowDown) through "
                f"{self.attempts} attempts; try again later or add another --source"
            ), True
        return self._client_failure(where, exc)

    def _client_failure(self, where: str, exc: Exception) -> tuple[SourceError, bool]:
        """Errors the client libraries raise as their own classes (named, not imported)."""
        kind = type(exc).__name__
        if kind in {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"}:
            return SourceError(
                f"no usable credentials for {self.url}: {exc}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass anon for a public bucket"
            ), True
        if kind in {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}:
            return SourceUnreachableError(f"cannot connect to {self.url}: {exc}"), True
        if kind in {"ReadTimeoutError", "ConnectionClosedError", "TimeoutError"}:
            return DownloadError(f"{where} stopped sending data: {exc}"), True
        return DownloadError(f"download of {where} failed: {kind}: {exc}"), False


def _channel_tag(info: Mapping[str, Any]) -> ChannelTag:
    """What identifies an object's version: its ETag (S3's ``ETag``, gcsfs and adlfs's
    ``etag``), else its modification time and size."""
    etag = info.get("ETag") or info.get("etag")
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if etag is None and modified is not None:
        etag = f"{modified}-{info.get('size')}"
    return ChannelTag(
        etag=str(etag) if etag is not None else None,
        modified=str(modified) if modified is not None else None,
    )
