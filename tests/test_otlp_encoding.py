"""Kensho's event dicts encoded straight into OTLP protobuf, decoded back here."""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from _otlp_support import any_value
from kensho.telemetry._encoding import LogBatchEncoder

RESOURCE = {"service.name": "edge-box", "service.version": "1.2.3"}
TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def decode(payload: bytes) -> Any:
    request = ExportLogsServiceRequest.FromString(payload)
    (resource_logs,) = request.resource_logs
    (scope_logs,) = resource_logs.scope_logs
    return resource_logs, scope_logs


def attributes(record: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in record.attributes}


def test_batch_keeps_resource_scope_severity_body_and_context_fields() -> None:
    encoder = LogBatchEncoder(RESOURCE, "kensho", "https://opentelemetry.io/schemas/1.0")
    event = {
        "timestamp": "2026-12-01T13:00:00.000Z",
        "level": "warning",
        "service": "storage",
        "event": "file repaired",
        "path": "models/x.bin",
        "bytes": 42,
        "ratio": 0.5,
        "ok": True,
        "missing": None,
        "detail": {"from": "usb", "tries": [1, 2]},
        "pair": ("a", 1),
    }
    payload, records = encoder.encode([(1_700_000_000_123_456_789, event)])
    resource_logs, scope_logs = decode(payload)

    assert records == 1
    assert {kv.key: any_value(kv.value) for kv in resource_logs.resource.attributes} == RESOURCE
    assert resource_logs.schema_url == "https://opentelemetry.io/schemas/1.0"
    assert scope_logs.scope.name == "kensho"
    (record,) = scope_logs.log_records
    assert record.time_unix_nano == record.observed_time_unix_nano == 1_700_000_000_123_456_789
    assert (record.severity_text, record.severity_number) == ("warning", 13)
    assert any_value(record.body) == "file repaired"
    assert attributes(record) == {
        "service": "storage",
        "path": "models/x.bin",
        "bytes": 42,
        "ratio": 0.5,
        "ok": True,
        "missing": None,
        "detail": {"from": "usb", "tries": [1, 2]},
        "pair": ["a", 1],
    }
    assert (record.trace_id, record.span_id, record.flags) == (b"", b"", 0)


def test_levels_map_to_otel_severity_numbers() -> None:
    encoder = LogBatchEncoder(RESOURCE, "kensho")
    levels = ["debug", "info", "warning", "error", "critical"]
    payload, _ = encoder.encode([(1, {"level": level, "event": "x"}) for level in levels])
    _, scope_logs = decode(payload)
    assert [r.severity_number for r in scope_logs.log_records] == [5, 9, 13, 17, 21]
    assert [r.severity_text for r in scope_logs.log_records] == levels


def test_error_becomes_exception_attributes_with_the_cause_chain() -> None:
    cause = {"type": "OSError", "message": "disk", "stack": []}
    error = {
        "type": "ValueError",
        "message": "bad chunk",
        "stack": [{"file": "a.py", "line": 3, "function": "f", "code": "raise X"}],
        "cause": cause,
    }
    payload, _ = LogBatchEncoder(RESOURCE, "kensho").encode(
        [(1, {"level": "error", "event": "repair failed", "error": error})]
    )
    (record,) = decode(payload)[1].log_records
    found = attributes(record)
    assert found["exception.type"] == "ValueError"
    assert found["exception.message"] == "bad chunk"
    trace = found["exception.stacktrace"]
    assert trace.index("OSError: disk") < trace.index("direct cause") < trace.index("raise X")
    assert 'File "a.py", line 3, in f' in trace
    assert "error" not in found


def test_trace_and_span_ids_become_the_records_own_and_bad_ids_are_ignored() -> None:
    events = [
        (1, {"event": "inside", "trace_id": TRACE, "span_id": SPAN}),
        (2, {"event": "short", "trace_id": TRACE[:30], "span_id": SPAN}),
        (3, {"event": "not hex", "trace_id": "z" * 32, "span_id": SPAN}),
        (4, {"event": "zero", "trace_id": "0" * 32, "span_id": SPAN}),
    ]
    payload, records = LogBatchEncoder(RESOURCE, "kensho").encode(events)
    inside, *others = decode(payload)[1].log_records
    assert records == 4
    assert (inside.trace_id.hex(), inside.span_id.hex(), inside.flags) == (TRACE, SPAN, 1)
    assert "trace_id" not in attributes(inside)
    assert all((r.trace_id, r.span_id, r.flags) == (b"", b"", 0) for r in others)


def test_odd_values_become_text_and_never_fail_the_record() -> None:
    deep: dict[str, Any] = {"a": {"b": {"c": {"d": {"e": 1}}}}}
    event = {"event": "odd", "huge": 2**70, "raw": b"\x00", "deep": deep, "path": object}
    payload, _ = LogBatchEncoder(RESOURCE, "kensho").encode([(1, event)])
    found = attributes(decode(payload)[1].log_records[0])
    assert found["huge"] == str(2**70)
    assert found["raw"] == str(b"\x00")
    assert found["path"] == str(object)
    assert found["deep"] == {"a": {"b": {"c": {"d": '{"e":1}'}}}}


def test_attributes_past_the_limit_are_counted_as_dropped() -> None:
    event: dict[str, Any] = {"event": "wide", **{f"k{i:03d}": i for i in range(200)}}
    payload, _ = LogBatchEncoder(RESOURCE, "kensho").encode([(1, event)])
    (record,) = decode(payload)[1].log_records
    assert len(record.attributes) == 128
    assert record.dropped_attributes_count == 72
    assert record.attributes[0].key == "k000"


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_an_event_that_cannot_be_encoded_is_dropped_and_counted_the_rest_go_out() -> None:
    encoder = LogBatchEncoder(RESOURCE, "kensho")
    events = [(1, {"event": "before"}), (2, {"event": "odd", "v": _Unprintable()})]
    events.append((3, {"event": "after"}))
    payload, records = encoder.encode(events)
    assert records == 2
    assert [any_value(r.body) for r in decode(payload)[1].log_records] == ["before", "after"]
    assert encoder.failed == 1
