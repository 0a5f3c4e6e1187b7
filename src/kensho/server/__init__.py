"""Kensho's HTTP API: OpenAI-compatible completions, health, metrics, status stream."""

from __future__ import annotations

from kensho.server._app import create_app
from kensho.server._context import IntegrityState, ServerContext

__all__ = ["IntegrityState", "ServerContext", "create_app"]
