"""Child-process engines in tests: a server that dies must take its child with it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

__all__ = ["child_exits_with_its_server"]


async def child_exits_with_its_server(script: str, *args: str, within: float = 30) -> None:
    """Run ``script`` (it loads an engine and prints the child's pid), SIGKILL it, and
    wait until that child has exited too: no cleanup runs in a killed server, so only
    the closed pipe can tell the child. Raises TimeoutError if the child outlives it."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=subprocess.PIPE
    )
    loop = asyncio.get_running_loop()
    try:
        assert server.stdout is not None
        child_pid = int(await server.stdout.readline())
        pidfd = os.pidfd_open(child_pid)  # readable once that process has exited
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            server.kill()
            await asyncio.wait_for(exited, within)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()
