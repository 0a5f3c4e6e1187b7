"""Spans, and the trace and span ids on every log record emitted inside one.

Only imported when OTLP export is configured (the ``otel`` extra): without it,
:func:`kensho.telemetry.span` is a no-op and nothing here runs.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from opentelemetry.trace import get_current_span

__all__ = ["add_trace_ids"]


def add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add ``trace_id`` / ``span_id`` (lower-case hex, as W3C writes them) inside a span."""
    context = get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict
