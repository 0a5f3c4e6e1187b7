"""What every source kind shares: the :class:`Source` protocol, the sink, one error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from kensho.errors import DownloadError, SourceUnreachableError

__all__ = ["PIECE", "Sink", "Source", "SourceUnreachableError", "size_mismatch"]

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


def size_mismatch(where: str, offered: int, declared: int) -> DownloadError:
    """The error for a source whose copy of a file has another size than declared."""
    return DownloadError(
        f"{where} offers {offered} bytes but the manifest declares {declared}; "
        "the source holds another version of this file (update the mirror or the manifest)"
    )
