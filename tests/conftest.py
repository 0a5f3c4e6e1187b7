"""Shared fixtures. Logging is process-global: every test starts from the defaults."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from structlog.contextvars import clear_contextvars

from kensho.config import LogSettings
from kensho.telemetry import log_service


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    clear_contextvars()
    yield
    clear_contextvars()
    log_service().configure(LogSettings(format="json"))
