"""What the HTTP layer needs from the running system, and nothing more.

The kernel builds a :class:`ServerContext` after boot; tests build one around
fault-injecting engines. Keeping this seam small keeps the server a thin adapter:
routing, admission and integrity live in the layers below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kensho.events import ReleaseSnapshot
from kensho.hub import EventHub
from kensho.runtime.executor import TaskExecutor
from kensho.runtime.manager import RuntimeManager
from kensho.server._drain import Drain
from kensho.storage.report import IntegrityStatus

if TYPE_CHECKING:
    from kensho.server._chunks import ChunkService

__all__ = ["IntegrityState", "ServerContext"]


@dataclass
class IntegrityState:
    """The store's last verification, as health, readiness and metrics report it.

    ``status`` is the storage side's verdict (:class:`IntegrityStatus`): ``ok``
    (every file good), ``degraded`` (an optional file is missing or corrupt),
    ``failed`` (a required file is: ``/readyz`` answers 503) or ``unverified`` (no
    store behind this server, e.g. a test engine); a plain string is accepted and
    checked. ``files`` counts files by verification status; ``problems`` maps paths
    to reasons.
    """

    status: IntegrityStatus = IntegrityStatus.UNVERIFIED
    files: dict[str, int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    offline: bool = False
    checked_at: float | None = None

    def __post_init__(self) -> None:
        self.status = IntegrityStatus(self.status)  # "degraded" -> DEGRADED; typos refused

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "files": dict(self.files),
            "problems": dict(self.problems),
            "offline": self.offline,
            "checked_at": self.checked_at,
        }


@dataclass
class ServerContext:
    """The running runtime, executor and store status behind one HTTP server.

    ``api_key`` guards the API (``/v1/*``) and admin endpoints; health, readiness
    and metrics stay open for probes and scrapers unless ``protect_metrics``.
    ``release`` reads where the store stands with over-the-air releases;
    ``apply_update`` applies the staged release now (``POST /v1/kensho/update``).
    ``chunks`` shares the store's verified chunks with peers (``None``: not shared).
    """

    runtime: RuntimeManager
    executor: TaskExecutor
    hub: EventHub
    model_id: str
    integrity: IntegrityState = field(default_factory=IntegrityState)
    verify: Callable[[], Awaitable[IntegrityState]] | None = None
    api_key: str | None = None
    protect_metrics: bool = False
    host: str = "127.0.0.1"
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    request_timeout: float | None = None
    log_counts: Callable[[], dict[str, int]] | None = None
    export_stats: Callable[[], Mapping[str, Mapping[str, int]] | None] | None = None
    drain: Drain = field(default_factory=Drain)
    release: Callable[[], ReleaseSnapshot] | None = None
    apply_update: Callable[[], Awaitable[dict[str, Any]]] | None = None
    chunks: ChunkService | None = None

    @property
    def draining(self) -> bool:
        """True from the first shutdown signal on: new work gets 503."""
        return self.drain.draining

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the shutdown begins: the status streams end on it."""
        return self.drain.stopping

    def begin_shutdown(self) -> None:
        """Refuse new completions and end the status streams; in-flight work goes on."""
        self.drain.begin()
