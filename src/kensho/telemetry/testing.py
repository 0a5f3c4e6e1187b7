"""Helpers for testing code that logs through Kensho, ours and users'.

::

    from kensho.telemetry.testing import capture_logs

    with capture_logs() as events:
        do_something()
    assert events[0]["event"] == "file verified"

Captured events went through the whole processor chain (header, context, redaction,
structured errors), exactly as they would be written, minus the final rendering.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kensho.telemetry import log_service

__all__ = ["capture_logs"]


@contextmanager
def capture_logs(min_level: str | None = "debug") -> Iterator[list[dict[str, Any]]]:
    """Collect every event emitted inside the block, instead of writing it.

    ``min_level`` lowers every service to that level for the duration (``None``
    keeps the configured levels, to test filtering itself).
    """
    with log_service().capture(min_level) as events:
        yield events
