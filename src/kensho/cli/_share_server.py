"""The uvicorn server of ``kensho share``, apart so that declaring the command loads no uvicorn."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvicorn

from kensho.cli._app import out_console

__all__ = ["ShareServer"]


class ShareServer(uvicorn.Server):
    """uvicorn that says where it listens once it does (``--port 0`` picks the port)."""

    def __init__(self, config: uvicorn.Config, root: Path, chunks: int) -> None:
        super().__init__(config)
        self._root = root
        self._chunks = chunks

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
