"""Release channels: find the newest trusted release the sources publish.

Every source that implements :class:`~kensho.storage.sources.ReleaseFeed` publishes
its current release as ``manifest.json`` at its root. :meth:`ReleaseChannel.check`
polls each one (conditionally: an unchanged channel answers ``304`` or the same
file stat and costs no manifest transfer) and passes what it gets through every
trust rule the store applies to a manifest given by hand, before anything else:

- it parses (size limit, schema, paths: :func:`~kensho.storage.manifest.parse_manifest`);
- it is for this store (same ``name`` as the trusted manifest);
- its signatures meet the pinned and configured keys and threshold;
- no rollback: a lower serial, or the trusted serial with other content, is refused;
- it has not expired (an expired release fetches nothing, so it cannot be staged).

Sources that fetch chunks by hash (:class:`~kensho.storage.sources.ChunkAddressed`:
``peer+http://``) are skipped, explicitly and quietly: a peer is a neighbour holding
verified chunks, not an authority, and has no ``manifest.json`` to publish. Polling
it would only fail at every interval; the origin behind it publishes the release.

A refused release is reported once (a :class:`~kensho.events.ReleaseRefused` per
distinct manifest and source), never staged nor applied; the next poll of the same
bytes stays quiet. Why the check lives here and not in the prefetch: a release that
fails it must not cost one byte of staging, nor one line of the plan.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

from kensho.errors import KenshoError, SourceError, SourceUnreachableError
from kensho.events import Event, ReleaseChecked, ReleaseRefused
from kensho.storage.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from kensho.storage.release import Release, ReleaseTrust
from kensho.storage.sources import ChannelTag, ChunkAddressed, ReleaseFeed, Source
from kensho.telemetry import get_logger

__all__ = ["ChannelResult", "ReleaseChannel"]

_log = get_logger("storage.release")


@dataclass(frozen=True, slots=True)
class ChannelResult:
    """What one check found; ``manifest`` is set for ``new`` and ``current``.

    ``result`` is one of ``new``, ``current``, ``unchanged``, ``refused``, ``none``
    (no source publishes a release) or ``unreachable`` (see
    :class:`~kensho.events.ReleaseChecked`).
    """

    result: str
    source: str | None = None
    manifest: Manifest | None = None
    detail: str = ""
    checked_at: float = field(default_factory=time.time)


@dataclass
class _Seen:
    """The last answer of one channel: its tag and bytes, the trusted serial then, and
    the verdict (a ``304`` while the store did not move re-uses it)."""

    tag: ChannelTag
    data: bytes
    current: int | None
    result: ChannelResult


class _Refused(Exception):
    """A fetched manifest broke a trust rule (internal: becomes a ``refused`` result)."""

    def __init__(self, reason: str, serial: int | None) -> None:
        super().__init__(reason)
        self.serial = serial


class ReleaseChannel:
    """The release channels of one store's sources, checked against its trust.

    ``trust`` is the store's :class:`ReleaseTrust` (the one its manager uses), so a
    channel release is held to exactly the rules of a ``kensho sync --manifest``.
    ``emit`` receives :class:`ReleaseChecked` after each check and
    :class:`ReleaseRefused` once per distinct refused manifest. :attr:`skipped`
    names the sources that publish no release (peers, and kinds without a channel).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        trust: ReleaseTrust,
        emit: Callable[[Event], None],
        *,
        max_bytes: int = MAX_MANIFEST_BYTES,
    ) -> None:
        self.feeds = [s for s in sources if _publishes_releases(s)]
        self.skipped = [s.name for s in sources if not _publishes_releases(s)]
        self.trust = trust
        self.emit = emit
        self.max_bytes = max_bytes
        self.last: ChannelResult | None = None
        self._seen: dict[str, _Seen] = {}
        self._reported: set[tuple[str, str]] = set()  # (source, sha256 of the bytes)

    async def check(self) -> ChannelResult:
        """Poll every channel; the best result (the highest new serial first)."""
        trusted = await self.trust.trusted_manifest()
        results = [await self._check_one(feed, trusted) for feed in self.feeds]
        result = _best(results, self.skipped)
        self.last = result
        serial = result.manifest.serial if result.manifest is not None else None
        current = trusted.serial if trusted is not None else None
        if result.result == "new":
            _log.info("release found", source=result.source, serial=serial, current=current)
        self.emit(
            ReleaseChecked(
                result=result.result,
                source=result.source,
                serial=serial,
                current_serial=current,
                detail=result.detail,
            )
        )
        return result

    async def _check_one(self, feed: ReleaseFeed, trusted: Manifest | None) -> ChannelResult:
        seen = self._seen.get(feed.name)
        try:
            answer = await feed.fetch_release(seen.tag if seen else None, self.max_bytes)
        except SourceUnreachableError as exc:
            return ChannelResult("unreachable", feed.name, detail=str(exc))
        except SourceError as exc:
            return ChannelResult("none", feed.name, detail=str(exc))
        current = trusted.serial if trusted is not None else None
        if answer.data is None and seen is not None and seen.current == current:
            # Unchanged, and so is the store: the verdict stands (and stays quiet).
            kept = seen.result
            result = "unchanged" if kept.result in {"new", "current"} else kept.result
            return ChannelResult(result, feed.name, kept.manifest, kept.detail)
        data = answer.data if answer.data is not None else (seen.data if seen else b"")
        verdict = await self._verdict(feed.name, data, trusted)
        self._seen[feed.name] = _Seen(answer.tag, data, current, verdict)
        return verdict

    async def _verdict(self, source: str, data: bytes, trusted: Manifest | None) -> ChannelResult:
        try:
            manifest = await self._trusted(data, trusted)
        except _Refused as exc:
            self._report(source, data, exc)
            return ChannelResult("refused", source, detail=str(exc))
        if trusted is not None and manifest.serial == trusted.serial:
            return ChannelResult("current", source, manifest)
        return ChannelResult("new", source, manifest)

    async def _trusted(self, data: bytes, trusted: Manifest | None) -> Manifest:
        """``data`` as a manifest that passed every trust rule, or raise :class:`_Refused`."""
        try:
            manifest = parse_manifest(data)
        except KenshoError as exc:
            raise _Refused(f"not a valid manifest: {exc}", None) from None
        if trusted is None:
            raise _Refused(
                "the store has no trusted release yet; run `kensho sync --manifest ...` once",
                manifest.serial,
            )
        if manifest.name != trusted.name:
            raise _Refused(
                f"the manifest is for the store {manifest.name!r}, not {trusted.name!r}",
                manifest.serial,
            )
        try:
            release = await self.trust.select(Release.of(manifest))
        except KenshoError as exc:  # signatures, threshold, rollback
            raise _Refused(str(exc), manifest.serial) from None
        if release.expired is not None:
            raise _Refused(str(release.expired), manifest.serial)
        return manifest

    def _report(self, source: str, data: bytes, exc: _Refused) -> None:
        key = (source, hashlib.sha256(data).hexdigest())
        if key in self._reported:
            return
        self._reported.add(key)
        self.emit(ReleaseRefused(source=source, serial=exc.serial, reason=str(exc)))


_RANK = {"new": 0, "current": 1, "unchanged": 2, "refused": 3, "unreachable": 4, "none": 5}


def _publishes_releases(source: Source) -> TypeGuard[ReleaseFeed]:
    """Whether ``source`` has a release channel to poll: a peer never has one, even
    if a future peer kind also grew a ``fetch_release``."""
    return isinstance(source, ReleaseFeed) and not isinstance(source, ChunkAddressed)


def _best(results: Sequence[ChannelResult], skipped: Sequence[str] = ()) -> ChannelResult:
    """The result that matters most: the newest release, then any trusted answer, then
    a refusal (worth an operator's look), then silence."""
    if not results:
        detail = "no source publishes releases"
        if skipped:
            detail += f" (not polled: {', '.join(skipped)}; peers serve chunks only)"
        return ChannelResult("none", detail=detail)

    def key(r: ChannelResult) -> tuple[int, int]:
        serial = r.manifest.serial if r.manifest is not None else 0
        return _RANK[r.result], -serial

    return min(results, key=key)
