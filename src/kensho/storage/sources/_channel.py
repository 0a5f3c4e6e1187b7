"""The release channel of a source: its current manifest, published at its root.

A source that publishes releases implements one more method, :meth:`ReleaseFeed.
fetch_release`: return the bytes of ``manifest.json`` at its root, or say that it is
unchanged since the :class:`ChannelTag` of the last answer (an HTTP ``ETag`` /
``Last-Modified``, a mirror file's stat). A source kind without it (an object store,
a peer, until they add it) is simply not polled.

Why the tag: a fleet polls often and releases change rarely; an unchanged channel
must cost one small response (``304 Not Modified``), not the whole manifest.
Why a byte limit: the manifest comes from the network before anything vouches for
it; a channel serving endless data must not fill memory (tuf's ``max_length``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kensho.errors import DownloadError

__all__ = ["CHANNEL_FILE", "ChannelAnswer", "ChannelTag", "ReleaseFeed", "too_large"]

#: Where a source publishes its current release, relative to its root.
CHANNEL_FILE = "manifest.json"


@dataclass(frozen=True, slots=True)
class ChannelTag:
    """What identifies the channel's last answer, for a conditional request."""

    etag: str | None = None
    modified: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelAnswer:
    """One poll: ``data`` is ``None`` when the channel did not change since the tag
    given; ``tag`` identifies this answer (pass it to the next poll)."""

    data: bytes | None
    tag: ChannelTag


@runtime_checkable
class ReleaseFeed(Protocol):
    """A source that publishes its current release as :data:`CHANNEL_FILE`."""

    @property
    def name(self) -> str: ...

    async def fetch_release(self, tag: ChannelTag | None, max_bytes: int) -> ChannelAnswer:
        """The manifest bytes at the source's root, or "unchanged since ``tag``".

        Raises ``SourceUnreachableError`` (cannot reach the source), ``SourceError``
        (no channel there: nothing published) or ``DownloadError`` (the transfer
        broke, or the body is larger than ``max_bytes``: see :func:`too_large`).
        """
        ...


def too_large(where: str, max_bytes: int) -> DownloadError:
    """The error for a channel whose manifest is larger than the limit."""
    return DownloadError(
        f"the release manifest at {where} is larger than {max_bytes} bytes; refused "
        "without reading the rest (is the channel serving something else?)"
    )
