"""``kensho share``: serve a store's verified chunks to peers, without a model.

The same route ``kensho up`` serves (``GET /v1/kensho/chunks/{sha256}``), for a
device that only keeps a store: a cache box on the site, a laptop that synced first.
Other stores fetch from it with ``--source peer+http://HOST:PORT``, or find it on
the LAN with ``--source peer+mdns://`` when it announces itself (``--announce``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from kensho.cli._app import app, err_console, plain, run_async, state

__all__ = ["share"]

_SHARE_HELP = (
    "Serve the verified chunks of a store to peers, without a model.\n\n"
    "Only chunks of files whose last check passed are served, each hashed again as "
    "it is read; share.max_transfers and share.rate_limit bound what peers may cost "
    "this device. Other stores fetch from it by hash with "
    "--source peer+http://HOST:PORT (and fall back on their next source).\n\n"
    "--announce (or share.announce) also tells the LAN, over mDNS/DNS-SD, that a Kensho "
    "store serves here, for stores that list --source peer+mdns://: the bind address "
    "decides who hears it (127.0.0.1: this machine only). Needs the mdns extra.\n\n"
    "\b\nExamples:\n"
    '  kensho share --root /srv/models --host 0.0.0.0 --port 8700 --api-key "$KEY"\n'
    "  kensho sync -m manifest.json --root ./store -s peer+http://10.0.0.5:8700 -s https://origin/\n"
    '  kensho share --root /srv/models --host 0.0.0.0 --api-key "$KEY" --announce\n'
    "  kensho sync -m manifest.json --root ./store -s peer+mdns:// -s https://origin/\n\n"
    "Exit codes: 0 stopped by a signal · 2 the folder holds no synced store, or "
    "--announce without the mdns extra · 10 the port is taken."
)


def _check_store(root: Path) -> None:
    from kensho.storage.state import StateStore

    if not root.is_dir():
        raise typer.BadParameter(f"{root} is not a folder", param_hint="--root")
    if not StateStore(root).manifest_path.is_file():
        raise typer.BadParameter(
            f"{root} holds no synced store (no .kensho/trusted-manifest.json): "
            "run kensho sync on it first",
            param_hint="--root",
        )


def _check_zeroconf() -> None:
    from kensho.errors import SourceError
    from kensho.storage.sources.mdns import require_zeroconf

    try:
        require_zeroconf("--announce")
    except SourceError as exc:
        raise typer.BadParameter(str(exc), param_hint="--announce") from None


@app.command(help=_SHARE_HELP)
def share(
    root: Annotated[Path, typer.Option("--root", help="The store folder to share.")],
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default server.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port (default server.port; 0 picks a free one)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require this Bearer token (or set KENSHO_API_KEY).", show_default=False),
    ] = None,
    announce: Annotated[
        bool | None,
        typer.Option(
            "--announce/--no-announce",
            help="Announce the store on the LAN over mDNS (default share.announce, off).",
            show_default=False,
        ),
    ] = None,
) -> None:
    # The server stack (FastAPI, uvicorn) loads only for the commands that serve.
    import uvicorn

    from kensho.cli._announce import Announcement
    from kensho.cli._share_server import ShareServer
    from kensho.server import ChunkService, create_share_app
    from kensho.server._guard import is_loopback

    settings = state().settings
    _check_store(root)
    bind = host or settings.server.host
    key = api_key or settings.server.api_key
    wanted = settings.share.announce if announce is None else announce
    if wanted:
        _check_zeroconf()
    if not key and not is_loopback(bind):
        err_console.print(
            plain(
                f"warning: sharing on {bind} without an API key: anyone who can reach this "
                "port can download the store's files (set --api-key)"
                + ("; --announce tells the whole LAN where it is" if wanted else ""),
                style="yellow",
            )
        )
    service = ChunkService.for_store(root, settings.share)
    try:
        config = uvicorn.Config(
            create_share_app(service, api_key=key, host=bind),
            host=bind,
            port=settings.server.port if port is None else port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        announce_at = partial(Announcement, bind, api_key_required=bool(key)) if wanted else None
        server = ShareServer(config, root, len(service.shelf), announce=announce_at)
        try:
            run_async(server.serve())
        except SystemExit:  # uvicorn's own exit (3) when it cannot listen
            if server.started:
                raise
    finally:
        service.close()
    if not server.started:  # uvicorn logged why (the port is taken)
        raise typer.Exit(10)
