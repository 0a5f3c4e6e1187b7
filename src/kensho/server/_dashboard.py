"""The operator's dashboard at ``/``: one page that follows the status stream.

The page and its assets ship as package data (``kensho/server/dashboard/``) and
are read once: no CDN, no external font, no build step, so it works on an edge box
with no network. They hold no data, so they are served without the API key (the page
asks for the key, then sends it as a Bearer token on ``/v1/kensho/status``, which
stays guarded like every other API path).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

__all__ = ["DASHBOARD_PATHS", "add_dashboard_routes"]

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
    "/dashboard/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
#: Paths served without the API key: static files, no server data in them.
DASHBOARD_PATHS = frozenset(_ASSETS)
_HEADERS = {
    "Cache-Control": "no-cache",  # a new version of Kensho serves its own page at once
    "X-Content-Type-Options": "nosniff",
    # Everything from this server only: no inline script, no other origin.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


@cache
def _asset(name: str) -> bytes:
    return (resources.files("kensho.server") / "dashboard" / name).read_bytes()


def add_dashboard_routes(app: FastAPI) -> None:
    """Register ``GET /`` and the page's assets on ``app``."""
    for path, (name, media_type) in _ASSETS.items():

        async def serve(name: str = name, media_type: str = media_type) -> Response:
            return Response(_asset(name), media_type=media_type, headers=_HEADERS)

        app.add_api_route(path, serve, methods=["GET"], include_in_schema=False)
