"""A folder holding the files at their manifest paths (a USB stick, an NFS share)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kensho.errors import DownloadError, SourceError
from kensho.storage.sources._base import PIECE, Sink, SourceUnreachableError, size_mismatch
from kensho.storage.sources._channel import CHANNEL_FILE, ChannelAnswer, ChannelTag, too_large

__all__ = ["MirrorSource"]


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
            raise size_mismatch(str(target), size, file_size)
        return fd

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        fd = await asyncio.to_thread(self._open, path, file_size)
        try:
            pos, end = offset, offset + length
            while pos < end:
                try:
                    piece = await asyncio.to_thread(os.pread, fd, min(PIECE, end - pos), pos)
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

    async def fetch_release(self, tag: ChannelTag | None, max_bytes: int) -> ChannelAnswer:
        """``manifest.json`` in the folder; unchanged while its stat is the tag's."""
        return await asyncio.to_thread(self._read_release, tag, max_bytes)

    def _read_release(self, tag: ChannelTag | None, max_bytes: int) -> ChannelAnswer:
        fd = self._open_channel()
        try:
            info = os.fstat(fd)
            now = ChannelTag(etag=f"{info.st_ino}-{info.st_size}-{info.st_mtime_ns}")
            if tag is not None and tag.etag == now.etag:
                return ChannelAnswer(None, now)
            if info.st_size > max_bytes:
                raise too_large(str(self.root / CHANNEL_FILE), max_bytes)
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise too_large(str(self.root / CHANNEL_FILE), max_bytes)
        return ChannelAnswer(data, now)

    def _open_channel(self) -> int:
        """The channel file, opened like any file of the mirror (inside it, regular)."""
        if not self.root.is_dir():
            raise SourceUnreachableError(
                f"mirror folder {self.root} is not there (is the drive mounted?)"
            )
        target = self.root / CHANNEL_FILE
        if not target.exists():
            raise SourceError(f"{target} is not there: this mirror publishes no release")
        try:
            size = target.stat().st_size
        except OSError as exc:
            raise SourceError(f"cannot read {target}: {exc.strerror}") from exc
        return self._open(CHANNEL_FILE, size)

    async def aclose(self) -> None:
        return None
