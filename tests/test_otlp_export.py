"""OTLP/HTTP export and the disk spool, against a real collector on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _otlp_support import Collector, running_collector
from _server_support import kensho_env, run_kensho
from kensho.config import LogSettings, TelemetrySettings, load_settings
from kensho.errors import ConfigError
from kensho.telemetry import LoggerService, span
from kensho.telemetry._spool import Outcome, Spool


@pytest.fixture
def service() -> Iterator[LoggerService]:
    svc = LoggerService()
    yield svc
    svc.close()


def export_to(svc: LoggerService, spool: Path, **fields: Any) -> None:
    svc.configure(
        LogSettings(),
        stream=io.StringIO(),
        capture_stdlib=False,
        telemetry=TelemetrySettings(spool_dir=spool, **fields),
    )


def test_records_arrive_with_kensho_schema_and_resource(
    service: LoggerService, tmp_path: Path
) -> None:
    with running_collector() as collector:
        export_to(
            service,
            tmp_path / "spool",
            endpoint=collector.endpoint,
            service_name="edge-box",
            resource_attributes={"deployment.environment": "lab"},
            headers={"Authorization": "Bearer s3cret-token"},
        )
        log = service.get_logger("storage")
        log.warning("file repaired", path="models/x.bin", bytes=42, detail={"from": "usb"})
        try:
            raise ValueError("bad chunk")
        except ValueError:
            log.exception("repair failed", path="models/y.bin")
        service.flush_export()
        collector.wait_for(lambda c: len(c.logs) == 2)

    first, second = collector.logs
    assert first.resource["service.name"] == "edge-box"
    assert first.resource["service.version"]
    assert first.resource["host.name"] == os.uname().nodename
    assert first.resource["deployment.environment"] == "lab"
    assert (first.body, first.severity_text, first.severity_number) == (
        "file repaired",
        "warning",
        13,
    )
    assert first.attributes == {
        "service": "storage",
        "path": "models/x.bin",
        "bytes": 42,
        "detail": {"from": "usb"},
    }
    assert second.severity_number == 17
    assert second.attributes["exception.type"] == "ValueError"
    assert second.attributes["exception.message"] == "bad chunk"
    assert 'raise ValueError("bad chunk")' in second.attributes["exception.stacktrace"]
    assert "error" not in second.attributes
    assert collector.headers[0]["Authorization"] == "Bearer s3cret-token"
    assert service.export.stats()["logs"]["exported"] == 2


def test_records_inside_a_span_carry_its_ids_in_json_and_otlp(
    service: LoggerService, tmp_path: Path
) -> None:
    stream = io.StringIO()
    with running_collector() as collector:
        service.configure(
            LogSettings(format="json"),
            stream=stream,
            capture_stdlib=False,
            telemetry=TelemetrySettings(spool_dir=tmp_path, endpoint=collector.endpoint),
        )
        with service.span("kernel.boot", phase="verify"):
            service.get_logger("kernel").info("inside")
        service.flush_export()
        collector.wait_for(lambda c: len(c.logs) == 1 and len(c.spans) == 1)
    line = json.loads(stream.getvalue().splitlines()[0])
    (boot,) = collector.spans
    assert boot.name == "kernel.boot" and boot.attributes == {"phase": "verify"}
    assert line["trace_id"] == boot.trace_id and line["span_id"] == boot.span_id
    assert (collector.logs[0].trace_id, collector.logs[0].span_id) == (boot.trace_id, boot.span_id)
    assert "trace_id" not in collector.logs[0].attributes


def test_trace_ids_follow_the_current_span_into_and_out_of_nested_spans(
    service: LoggerService, tmp_path: Path
) -> None:
    stream = io.StringIO()
    with running_collector() as collector:
        service.configure(
            LogSettings(format="json"),
            stream=stream,
            capture_stdlib=False,
            telemetry=TelemetrySettings(spool_dir=tmp_path, endpoint=collector.endpoint),
        )
        log = service.get_logger("x")
        with service.span("outer"):
            log.info("outer, before")
            with service.span("inner"):
                log.info("inner")
            log.info("outer, after")
        log.info("outside")
        service.flush_export()
        collector.wait_for(lambda c: len(c.spans) == 2 and len(c.logs) == 4)
    spans = {s.name: s for s in collector.spans}
    outer = (spans["outer"].trace_id, spans["outer"].span_id)
    inner = (spans["inner"].trace_id, spans["inner"].span_id)
    assert inner[0] == outer[0] and spans["inner"].parent_span_id == outer[1]
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x.get("trace_id"), x.get("span_id")) for x in lines] == [
        outer,
        inner,
        outer,
        (None, None),
    ]
    assert [(r.trace_id, r.span_id) for r in collector.logs] == [outer, inner, outer, ("", "")]


@pytest.mark.parametrize("status", [503, 0])
def test_unreachable_or_5xx_collector_spools_then_sends_once(
    service: LoggerService, tmp_path: Path, status: int
) -> None:
    """503 or nothing listening: records wait on disk and go out once it answers."""
    collector = Collector(status=503)
    collector.start()
    if status == 0:
        collector.stop()  # the port is known and nothing listens on it
    export_to(service, tmp_path, endpoint=collector.endpoint, retry_interval=0.05)
    log = service.get_logger("runtime")
    for i in range(5):
        log.info("offline", n=i)
    service.flush_export()
    assert service.export.stats()["logs"]["spooled"] == 5
    assert list(tmp_path.glob("*.logs.*"))
    collector.status = 200
    if status == 0:
        collector.start()
    try:
        collector.wait_for(lambda c: len(c.logs) == 5)
        service.flush_export()
        service.close()
    finally:
        collector.stop()
    assert sorted(r.attributes["n"] for r in collector.logs) == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob("*.logs.*"))


def test_counters_per_signal_while_the_collector_comes_and_goes(
    service: LoggerService, tmp_path: Path
) -> None:
    """Records and spans counted apart: exported, spooled, failed requests, queue drops."""
    collector = Collector()
    collector.start()
    export_to(service, tmp_path, endpoint=collector.endpoint, retry_interval=60, queue_size=3)
    log = service.get_logger("x")
    try:
        with service.span("kensho.test"):
            log.info("a")
            log.info("b")
        service.flush_export()
        collector.wait_for(lambda c: len(c.logs) == 2 and len(c.spans) == 1)
        collector.stop()  # from here on nothing listens
        with service.export._batching:  # the batch thread waits: the queue fills up
            for n in range(5):  # the queue holds 3: two are dropped, counted
                log.info("offline", n=n)
        service.flush_export()
    finally:
        collector.stop()
    stats = service.export.stats()
    assert stats["traces"] == {
        "exported": 1,
        "spooled": 0,
        "queue_dropped": 0,
        "spool_evicted": 0,
        "spool_failed": 0,
        "rejected": 0,
        "unencodable": 0,
        "export_errors": 0,
        "queued": 0,
    }
    logs = stats["logs"]
    assert (logs["exported"], logs["spooled"], logs["queue_dropped"]) == (2, 3, 2)
    assert logs["export_errors"] == 1  # one attempt, then the spool until retry_interval
    assert logs["queued"] == 0


def test_collector_4xx_drops_the_batch_with_a_counter(
    service: LoggerService, tmp_path: Path
) -> None:
    with running_collector(status=400) as collector:
        export_to(service, tmp_path, endpoint=collector.endpoint)
        service.get_logger("x").info("refused")
        service.flush_export()
        assert service.export.stats()["logs"]["rejected"] == 1
    assert not list(tmp_path.glob("*.logs.*"))  # retrying would never succeed


def test_slow_collector_times_out_into_the_spool(service: LoggerService, tmp_path: Path) -> None:
    with running_collector(delay=1.0) as collector:
        export_to(service, tmp_path, endpoint=collector.endpoint, timeout=0.2)
        service.get_logger("x").info("slow")
        service.flush_export()
        assert service.export.stats()["logs"]["spooled"] == 1
        collector.delay = 0.0
        collector.wait_for(lambda c: len(c.logs) == 1)


def test_unwritable_spool_drops_with_a_counter_never_raises(
    service: LoggerService, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    collector = Collector()
    collector.start()
    collector.stop()
    export_to(service, blocker / "spool", endpoint=collector.endpoint)
    service.get_logger("x").info("lost")
    service.flush_export()
    assert service.export.stats()["logs"]["spool_failed"] == 1


def test_spool_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=250)
    for i in range(5):
        assert spool.put("logs", bytes([i]) * 100, records=3)
    kept = [e.path.read_bytes()[0] for e in spool.entries()]
    assert kept == [3, 4]
    assert spool.stats.evicted == 9
    sent: list[bytes] = []
    assert spool.drain(lambda _signal, body: sent.append(body) or Outcome.SENT)
    assert [b[0] for b in sent] == [3, 4] and spool.stats.sent == 6
    assert spool.entries() == []


def test_spool_keeps_a_batch_the_collector_asks_to_retry(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    spool.put("logs", b"a", records=1)
    spool.put("logs", b"b", records=1)
    assert not spool.drain(lambda _s, _b: Outcome.RETRY)
    assert len(spool.entries()) == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://host:99999/v1/logs"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "bad name=1"),
    ],
)
def test_bad_endpoint_or_header_names_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(env={variable: value}, cwd=tmp_path)


def test_cli_exits_3_naming_a_bad_otel_variable(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="ftp://collector")
    result = run_kensho("config", "show", env=env, cwd=tmp_path)
    assert result.returncode == 3
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in result.stderr


def test_config_show_redacts_telemetry_headers(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer%20hunter22")
    result = run_kensho("config", "show", "--json", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hunter22" not in result.stdout
    assert json.loads(result.stdout)["telemetry"]["headers"] == {"Authorization": "[redacted]"}


def test_cli_spools_while_collector_is_down_and_the_next_run_sends_it_once(
    tmp_path: Path,
) -> None:
    """kensho offline → logs spooled → restarted with the collector up → all of them, once."""
    collector = Collector()
    collector.start()
    collector.stop()
    env = kensho_env(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_SERVICE_NAME="kensho-e2e",
        KENSHO_TELEMETRY_SPOOL_DIR=str(tmp_path / "spool"),
    )
    offline = run_kensho(
        "generate", "--engine", "mock", "--max-tokens", "4", "hi", env=env, cwd=tmp_path
    )
    assert offline.returncode == 0, offline.stderr
    logged = [json.loads(x) for x in offline.stderr.splitlines() if x.startswith("{")]
    assert logged and list((tmp_path / "spool").glob("*.logs.*"))

    collector.start()
    try:
        online = run_kensho(
            "generate", "--engine", "mock", "--max-tokens", "4", "hi", env=env, cwd=tmp_path
        )
        assert online.returncode == 0, online.stderr
    finally:
        collector.stop()
    by_run: dict[str, list[Any]] = {}
    for record in collector.logs:
        by_run.setdefault(record.resource["service.instance.id"], []).append(record)
    assert len(by_run) == 2
    # The run whose records were spooled: the first of the collector's batches.
    spooled = by_run[collector.logs[0].resource["service.instance.id"]]
    assert sorted(r.body for r in spooled) == sorted(e["event"] for e in logged)  # each once
    assert {r.resource["service.name"] for r in collector.logs} == {"kensho-e2e"}
    assert not list((tmp_path / "spool").glob("*.logs.*"))


def exporting_env(tmp_path: Path, collector: Collector, **extra: str) -> dict[str, str]:
    """A ``kensho`` subprocess environment that exports to ``collector``, spooling
    under ``tmp_path``."""
    return kensho_env(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        KENSHO_TELEMETRY_SPOOL_DIR=str(tmp_path / "spool"),
        **extra,
    )


def test_kensho_up_traces_requests_under_the_callers_traceparent(tmp_path: Path) -> None:
    """A real server: request span child of the incoming traceparent, logs carry its ids."""
    import httpx

    from _server_support import kensho_up

    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with running_collector() as collector:
        env = exporting_env(tmp_path, collector, KENSHO_MODEL_ENGINE="mock")
        with kensho_up(env=env, cwd=tmp_path) as server:
            answer = httpx.post(
                f"{server.url}/v1/kensho/breaker",
                json={"action": "heal_primary"},
                headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
            )
            assert answer.status_code == 200, answer.text
            line = server.wait_for_stderr("primary failure injection changed by admin")
            metrics = httpx.get(f"{server.url}/metrics").text
            assert server.stop() == 0
        collector.wait_for(lambda c: any(s.name == "POST /v1/kensho/breaker" for s in c.spans))
        collector.wait_for(lambda c: any(r.trace_id == trace_id for r in c.logs))

    (request,) = [s for s in collector.spans if s.name == "POST /v1/kensho/breaker"]
    assert (request.trace_id, request.parent_span_id) == (trace_id, parent_id)
    assert request.attributes["http.response.status_code"] == 200
    assert request.resource["service.name"] == "kensho"
    in_request = [r for r in collector.logs if r.trace_id == trace_id]
    (record,) = [r for r in in_request if r.body == "primary failure injection changed by admin"]
    assert record.span_id == request.span_id
    assert all(r.span_id == request.span_id for r in in_request)
    logged = json.loads(line)
    assert (logged["trace_id"], logged["span_id"]) == (trace_id, request.span_id)
    assert 'kensho_otlp_exported_total{signal="logs"}' in metrics
    assert 'kensho_otlp_dropped_total{reason="queue_full",signal="traces"} 0.0' in metrics
    boot = next(s for s in collector.spans if s.name == "kensho.boot")
    integrity = next(s for s in collector.spans if s.name == "kensho.verify_and_repair")
    assert integrity.parent_span_id == boot.span_id and integrity.trace_id == boot.trace_id
    assert any(r.body == "boot finished" and r.span_id == boot.span_id for r in collector.logs)


def test_span_without_export_is_a_no_op_that_keeps_exceptions() -> None:
    stream = io.StringIO()
    service = LoggerService()
    service.configure(LogSettings(format="json"), stream=stream, capture_stdlib=False)
    with pytest.raises(ValueError, match="kept"), service.span("noop"):
        service.get_logger("x").info("inside")
        raise ValueError("kept")
    assert "trace_id" not in json.loads(stream.getvalue())
    with span("module-level"):  # the process-wide service, export off in tests
        pass
    service.close()


def test_configure_logging_without_arguments_exports_when_otel_variables_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kensho.telemetry import configure_logging, get_logger, log_service

    with running_collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=edge%20ops")
        monkeypatch.setenv("KENSHO_TELEMETRY_SPOOL_DIR", str(tmp_path))
        monkeypatch.chdir(tmp_path)
        configure_logging(stream=io.StringIO())
        try:
            get_logger("library").info("from a library user")
            log_service().flush_export()
            collector.wait_for(lambda c: c.bodies() == ["from a library user"])
        finally:
            configure_logging(LogSettings())  # settings given, no telemetry: export off
        assert log_service().export is None
    assert collector.logs[0].resource["team"] == "edge ops"


def test_a_completion_is_traced_through_queue_engine_and_failover(tmp_path: Path) -> None:
    """The request span's children: the queue wait, each engine attempt, the failover."""
    import httpx

    from _server_support import kensho_up

    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with running_collector() as collector:
        env = exporting_env(tmp_path, collector, KENSHO_MODEL_ENGINE="mock")
        with kensho_up(env=env, cwd=tmp_path) as server:
            failing = httpx.post(
                f"{server.url}/v1/kensho/breaker", json={"action": "fail_primary", "times": 1}
            )
            assert failing.status_code == 200, failing.text
            answer = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": "kensho-demo", "prompt": "x", "max_tokens": 3},
                headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
            )
            assert answer.status_code == 200, answer.text
            assert server.stop() == 0
        collector.wait_for(
            lambda c: any(s.name == "kensho.engine cpu" and s.trace_id == trace_id for s in c.spans)
        )

    spans = [s for s in collector.spans if s.trace_id == trace_id]
    (request,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert request.parent_span_id == parent_id
    by_name = {s.name: s for s in spans}
    for child in ("kensho.queue_wait", "kensho.engine gpu", "kensho.failover", "kensho.engine cpu"):
        assert by_name[child].parent_span_id == request.span_id, child
    assert by_name["kensho.queue_wait"].attributes["kensho.engine"] == "gpu"
    assert by_name["kensho.engine gpu"].attributes["kensho.role"] == "primary"
    assert by_name["kensho.engine cpu"].attributes["kensho.role"] == "fallback"
    assert by_name["kensho.engine cpu"].attributes["kensho.tokens"] == 3
    assert by_name["kensho.failover"].attributes["kensho.failover.from"] == "gpu"
    assert by_name["kensho.failover"].attributes["kensho.failover.to"] == "cpu"


def test_cli_sync_and_verify_are_traced_with_their_logs(tmp_path: Path) -> None:
    """`kensho sync` and `kensho verify` each export one span; their records carry its ids."""
    from _storage_support import signed_for, write_tree

    files = {"models/a.bin": os.urandom(10_000), "cfg.json": b"{}"}
    write_tree(tmp_path / "mirror", files)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"signed": signed_for(files, 4096), "signatures": []}))
    store = tmp_path / "store"
    with running_collector() as collector:
        env = exporting_env(tmp_path, collector)
        for args in (
            ("sync", "-m", str(manifest), "-r", str(store), "-s", str(tmp_path / "mirror")),
            ("verify", "-m", str(manifest), "-r", str(store)),
        ):
            done = run_kensho(*args, env=env, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
        collector.wait_for(lambda c: {"kensho.sync", "kensho.verify"} <= {s.name for s in c.spans})

    inside: dict[str, set[str]] = {}
    for name in ("kensho.sync", "kensho.verify"):
        (traced,) = [s for s in collector.spans if s.name == name]
        records = [r for r in collector.logs if r.span_id == traced.span_id]
        assert all(r.trace_id == traced.trace_id for r in records)
        inside[name] = {r.body for r in records}
    assert "store ready" in inside["kensho.sync"]
    assert inside["kensho.verify"], "verify logged nothing inside its span"
