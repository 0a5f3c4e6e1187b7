"""Kensho's HTTP API: OpenAI-compatible completions, health, metrics, status stream."""

from __future__ import annotations

from kensho.server._app import create_app
from kensho.server._chunks import ChunkService, UploadPacer, create_share_app
from kensho.server._context import IntegrityState, ServerContext
from kensho.server._drain import Drain

__all__ = [
    "ChunkService",
    "Drain",
    "IntegrityState",
    "ServerContext",
    "UploadPacer",
    "create_app",
    "create_share_app",
]
