"""The uvicorn server of ``kensho share``, apart so that declaring the command loads no uvicorn."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from kensho.cli._announce import Announcement
from kensho.cli._app import out_console

__all__ = ["ShareServer"]


class ShareServer(uvicorn.Server):
    """uvicorn that says where it listens once it does (``--port 0`` picks the port).

    ``announce``, given the port it listens on, makes the LAN announcement
    (``--announce``): started once the port serves, so a start-up that fails never
    announced, and withdrawn first thing at shutdown, before connections drain.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        root: Path,
        chunks: int,
        *,
        announce: Callable[[int], Announcement] | None = None,
    ) -> None:
        super().__init__(config)
        self._root = root
        self._chunks = chunks
        self._announce = announce
        self.announcement: Announcement | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        out_console.print(
            f"kensho share: serving {self._chunks} verified chunks of {self._root} on "
            f"http://{shown}:{port}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.stdout.flush()
        if self._announce is not None:
            self.announcement = self._announce(port)
            self.announcement.start_soon()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn raises the signal it caught again once it stopped, which kills the
        # process before the command closes the shelf and flushes its logs; a stop
        # by SIGINT/SIGTERM is exit 0 (the command's help says so).
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.announcement is not None:
            await self.announcement.stop()
        await super().shutdown(sockets)
