"""Spans, and the trace and span ids on every log record emitted inside one.

Only imported when OTLP export is configured (the ``otel`` extra): without it,
:func:`kensho.telemetry.span` is a no-op and nothing here runs.

This processor runs on every log call while export is on, so it is kept to the
bare minimum: outside any span the OpenTelemetry context is empty and one lookup
says so; inside one, the hex ids of the last span seen are reused rather than
formatted again for each record.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from opentelemetry.context import get_current
from opentelemetry.trace import SpanContext, get_current_span

__all__ = ["add_trace_ids"]

# The last span context seen and its ids as hex; replaced whole (one tuple), so a
# thread reading it never sees a mix of two spans.
_last: tuple[SpanContext | None, str, str] = (None, "", "")


def add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add ``trace_id`` / ``span_id`` (lower-case hex, as W3C writes them) inside a span."""
    global _last  # noqa: PLW0603 - a one-entry cache, replaced atomically
    context = get_current()
    if not context:  # no span, no baggage: nothing to add (most records)
        return event_dict
    span_context = get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return event_dict
    cached = _last
    if cached[0] is not span_context:
        cached = (
            span_context,
            format(span_context.trace_id, "032x"),
            format(span_context.span_id, "016x"),
        )
        _last = cached
    event_dict["trace_id"] = cached[1]
    event_dict["span_id"] = cached[2]
    return event_dict
