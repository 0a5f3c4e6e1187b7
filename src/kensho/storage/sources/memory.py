"""Files held in memory: a source for tests, like httpx's ``MockTransport``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kensho.errors import DownloadError, SourceError
from kensho.storage.sources._base import PIECE, Sink, size_mismatch

__all__ = ["MemorySource"]


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
                raise size_mismatch(f"{self._name}:{path}", len(whole), file_size)
            data = whole[offset : offset + length]
        for i in range(0, len(data), PIECE):
            piece = data[i : i + PIECE]
            self.bytes_served += len(piece)
            await sink(piece)
        if len(data) < length:
            raise DownloadError(f"{self._name}:{path} ended early")

    async def aclose(self) -> None:
        return None
