"""What every source kind shares: the :class:`Source` protocol, the sink, one error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kensho.errors import DownloadError, SourceUnreachableError

if TYPE_CHECKING:
    from kensho.storage.manifest import Manifest

__all__ = ["PIECE", "ChunkAddressed", "Sink", "Source", "SourceUnreachableError", "size_mismatch"]

#: Receives the next bytes of a transfer, in order.
Sink = Callable[[bytes], Awaitable[None]]

#: The most bytes a source hands to the sink at once (bounds memory per transfer).
PIECE = 1 << 20


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


@runtime_checkable
class ChunkAddressed(Protocol):
    """A source that fetches chunks by their hash (a peer), not byte ranges of a path.

    It must know the chunk lists of the release being built: the manager calls
    :meth:`know` with that manifest before a repair or an update asks it for ranges.
    """

    def know(self, manifest: Manifest) -> None:
        """Take the chunk lists of ``manifest`` (replacing any earlier one)."""
        ...


def size_mismatch(where: str, offered: int, declared: int) -> DownloadError:
    """The error for a source whose copy of a file has another size than declared."""
    return DownloadError(
        f"{where} offers {offered} bytes but the manifest declares {declared}; "
        "the source holds another version of this file (update the mirror or the manifest)"
    )
