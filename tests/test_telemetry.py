"""LoggerService: every bullet of the telemetry issue, asserted on parsed JSON."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog

from kensho.config import LogSettings, load_settings
from kensho.errors import ConfigError
from kensho.telemetry import (
    REDACTED,
    LoggerService,
    bind_context,
    bound_context,
    configure_logging,
    get_logger,
    is_secret_key,
    log_service,
)
from kensho.telemetry.testing import capture_logs

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


class PipeStream(io.StringIO):
    def isatty(self) -> bool:
        return False


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def stream() -> PipeStream:
    out = PipeStream()
    configure_logging(stream=out, format="json", level="debug")
    return out


def test_event_is_one_json_object_per_line_with_the_schema(stream: PipeStream) -> None:
    get_logger("storage").info("file verified", path="a.bin", bytes=12)
    get_logger("runtime").warning("slow")
    first, second = lines(stream)
    assert list(first)[:4] == ["timestamp", "level", "service", "event"]
    assert TIMESTAMP.match(first["timestamp"])
    assert first == {
        "timestamp": first["timestamp"],
        "level": "info",
        "service": "storage",
        "event": "file verified",
        "path": "a.bin",
        "bytes": 12,
    }
    assert second["level"] == "warning"
    assert second["service"] == "runtime"


@pytest.mark.parametrize(
    ("method", "level"),
    [
        ("debug", "debug"),
        ("info", "info"),
        ("warning", "warning"),
        ("error", "error"),
        ("critical", "critical"),
    ],
)
def test_each_level_is_named(stream: PipeStream, method: str, level: str) -> None:
    getattr(get_logger("svc"), method)("message")
    assert lines(stream)[0]["level"] == level


def test_bind_adds_context_without_changing_the_parent(stream: PipeStream) -> None:
    log = get_logger("server")
    child = log.bind(model="demo")
    child.info("with")
    log.info("without")
    with_ctx, without_ctx = lines(stream)
    assert with_ctx["model"] == "demo"
    assert "model" not in without_ctx
    assert with_ctx["service"] == "server"


async def test_request_context_is_isolated_between_concurrent_tasks(
    stream: PipeStream,
) -> None:
    log = get_logger("server")
    both_bound = asyncio.Barrier(2)

    async def handle(request_id: str) -> None:
        bind_context(request_id=request_id)
        await both_bound.wait()  # both tasks have bound before either logs
        log.info("handled")

    await asyncio.gather(handle("r-1"), handle("r-2"))
    handled = [e for e in lines(stream) if e["event"] == "handled"]
    assert sorted(e["request_id"] for e in handled) == ["r-1", "r-2"]
    log.info("outside")
    assert "request_id" not in lines(stream)[-1]


def test_bound_context_is_removed_on_exit(stream: PipeStream) -> None:
    log = get_logger("executor")
    with bound_context(task_id="t-7"):
        log.info("inside")
    log.info("after")
    inside, after = lines(stream)
    assert inside["task_id"] == "t-7"
    assert "task_id" not in after


def _raise_with_secret_local() -> None:
    password = "hunter2-local"  # a local that must never be logged
    try:
        _ = len(password) / 0
    except ZeroDivisionError as exc:
        raise RuntimeError("could not open model") from exc


def test_errors_carry_structured_stack_and_cause_but_no_locals(stream: PipeStream) -> None:
    try:
        _raise_with_secret_local()
    except RuntimeError:
        get_logger("runtime").exception("load failed", model="demo")
    raw = stream.getvalue()
    assert "hunter2-local" not in raw
    event = json.loads(raw)
    assert event["level"] == "error"
    error = event["error"]
    assert error["type"] == "RuntimeError"
    assert error["message"] == "could not open model"
    functions = [frame["function"] for frame in error["stack"]]
    assert functions[-1] == "_raise_with_secret_local"
    assert all(set(frame) == {"file", "line", "function", "code"} for frame in error["stack"])
    assert error["cause"]["type"] == "ZeroDivisionError"
    assert "exc_info" not in event


def test_exc_info_accepts_an_exception_instance(stream: PipeStream) -> None:
    exc = ValueError("bad header")
    get_logger("storage").error("manifest rejected", exc_info=exc)
    error = lines(stream)[0]["error"]
    assert error == {"type": "ValueError", "message": "bad header", "stack": []}


def test_global_minimum_level_filters_lower_levels() -> None:
    out = PipeStream()
    configure_logging(stream=out, format="json", level="warning")
    log = get_logger("storage")
    log.info("dropped")
    log.warning("kept")
    assert [e["event"] for e in lines(out)] == ["kept"]


def test_per_service_overrides_apply_by_dotted_prefix() -> None:
    out = PipeStream()
    configure_logging(
        stream=out, format="json", level="info", levels={"storage": "debug", "runtime": "error"}
    )
    get_logger("storage.http").debug("storage child debug")
    get_logger("runtime.breaker").warning("runtime child warning")
    get_logger("server").debug("server debug")
    get_logger("server").info("server info")
    assert [e["event"] for e in lines(out)] == ["storage child debug", "server info"]


def test_levels_from_environment_variables() -> None:
    settings = load_settings(
        env={"KENSHO_LOG_LEVEL": "WARN", "KENSHO_LOG_LEVELS": "storage=debug,runtime=error"}
    )
    out = PipeStream()
    configure_logging(settings.log, stream=out, format="json")
    get_logger("storage").debug("a")
    get_logger("runtime").warning("b")
    get_logger("kernel").info("c")
    get_logger("kernel").warning("d")
    assert [e["event"] for e in lines(out)] == ["a", "d"]


def test_filtered_call_is_a_no_op_method() -> None:
    """Below the minimum level the method is structlog's bare ``return None``."""
    configure_logging(stream=PipeStream(), level="info")
    log = get_logger("hot.path")
    nop = structlog.make_filtering_bound_logger(logging.CRITICAL).info
    assert type(log).debug is nop
    assert log.debug("never rendered", payload=object()) is None


def test_reconfiguring_updates_loggers_obtained_before() -> None:
    first = PipeStream()
    configure_logging(stream=first, format="json", level="info")
    log = get_logger("early")
    log.debug("hidden")
    second = PipeStream()
    configure_logging(stream=second, format="json", level="debug")
    log.debug("shown")
    assert first.getvalue() == ""
    assert [e["event"] for e in lines(second)] == ["shown"]


def test_auto_format_is_json_when_not_a_tty() -> None:
    out = PipeStream()
    configure_logging(stream=out, format="auto")
    get_logger("cli").info("hello", n=1)
    assert lines(out)[0]["event"] == "hello"


def test_auto_format_is_readable_console_on_a_tty() -> None:
    out = TtyStream()
    configure_logging(stream=out, format="auto")
    get_logger("cli").info("hello console", n=1)
    text = out.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert "hello console" in text
    assert "n" in text
    assert text.count("\n") == 1


def test_forced_console_format_on_a_pipe() -> None:
    out = PipeStream()
    configure_logging(stream=out, format="console")
    get_logger("cli").info("readable")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.getvalue())


def test_file_sink_rotates_by_size_and_keeps_bounded_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "kensho.log"
    configure_logging(stderr=False, file=path, file_max_bytes=2_000, file_backups=2)
    log = get_logger("storage")
    for i in range(200):
        log.info("event", i=i, padding="x" * 40)
    log_service().close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["kensho.log", "kensho.log.1", "kensho.log.2"]
    for name in files:
        size = (path.parent / name).stat().st_size
        assert 0 < size <= 2_000
    # The newest events are in the live file and numbering is contiguous backwards.
    newest = [json.loads(line)["i"] for line in path.read_text().splitlines()]
    older = [json.loads(line)["i"] for line in (path.parent / "kensho.log.1").read_text().split()]
    assert newest[-1] == 199
    assert older[-1] + 1 == newest[0]


def test_file_sink_with_zero_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "k.log"
    configure_logging(stderr=False, file=path, file_max_bytes=500, file_backups=0)
    for i in range(50):
        get_logger("s").info("e", i=i)
    log_service().close()
    assert [p.name for p in tmp_path.iterdir()] == ["k.log"]
    assert json.loads(path.read_text().splitlines()[-1])["i"] == 49


def test_stdlib_logging_goes_through_the_same_renderer(stream: PipeStream) -> None:
    logging.getLogger("fsspec.http").info("HTTP Request: %s %s", "GET", "http://127.0.0.1/")
    try:
        raise OSError("connection reset")
    except OSError:
        logging.getLogger("uvicorn.error").exception("worker crashed")
    first, second = lines(stream)
    assert first["service"] == "fsspec.http"
    assert first["event"] == "HTTP Request: GET http://127.0.0.1/"
    assert first["level"] == "info"
    assert TIMESTAMP.match(first["timestamp"])
    assert second["service"] == "uvicorn.error"
    assert second["level"] == "error"
    assert second["error"]["type"] == "OSError"


@pytest.mark.parametrize(
    ("level", "levels", "kept"),
    [
        ("info", {}, ["slow"]),  # a line per HTTP request is not news at info
        ("info", {"httpx": "info"}, ["GET 206", "slow"]),  # unless asked for by name
        ("debug", {}, ["GET 206", "slow"]),
    ],
)
def test_httpx_request_lines_are_quiet_unless_asked_for(
    level: str, levels: dict[str, str], kept: list[str]
) -> None:
    out = PipeStream()
    configure_logging(stream=out, format="json", level=level, levels=levels)
    logging.getLogger("httpx").info("GET 206")
    logging.getLogger("httpx").warning("slow")
    assert [e["event"] for e in lines(out)] == kept


def test_stdlib_loggers_follow_per_service_levels() -> None:
    out = PipeStream()
    configure_logging(stream=out, format="json", level="info", levels={"httpx": "warning"})
    logging.getLogger("httpx").info("noisy")
    logging.getLogger("httpx").warning("kept")
    assert [e["event"] for e in lines(out)] == ["kept"]


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "token",
        "access_token",
        "api_key",
        "apiKey",
        "APIKEY",
        "X-Api-Key",
        "authorization",
        "Authorization",
        "secret",
        "client_secret",
    ],
)
def test_secret_keys_are_redacted(stream: PipeStream, key: str) -> None:
    get_logger("server").info("request", **{key: "s3cr3t-value"})
    assert "s3cr3t-value" not in stream.getvalue()
    assert lines(stream)[0][key] == REDACTED


@pytest.mark.parametrize("key", ["tokens", "max_tokens", "prompt_tokens", "completion_tokens"])
def test_token_counts_are_not_redacted(stream: PipeStream, key: str) -> None:
    get_logger("runtime").info("generated", **{key: 128})
    assert lines(stream)[0][key] == 128
    assert not is_secret_key(key)


def test_nested_secrets_are_redacted(stream: PipeStream) -> None:
    get_logger("server").info(
        "call", headers={"Authorization": "Bearer abc", "accept": "json"}, items=[{"token": "t"}]
    )
    event = lines(stream)[0]
    assert event["headers"] == {"Authorization": REDACTED, "accept": "json"}
    assert event["items"] == [{"token": REDACTED}]


def test_secrets_in_request_context_are_redacted(stream: PipeStream) -> None:
    with bound_context(api_key="from-context"):
        get_logger("server").info("x")
    assert lines(stream)[0]["api_key"] == REDACTED


def test_many_threads_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "threads.log"
    configure_logging(stderr=False, file=path, file_max_bytes=1 << 30)
    log = get_logger("threads")
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        for i in range(500):
            log.info("tick", worker=n, i=i, blob="y" * (n * 37))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log_service().close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == 8 * 500
    for n in range(8):
        assert [e["i"] for e in events if e["worker"] == n] == list(range(500))


def test_capture_logs_collects_processed_events() -> None:
    configure_logging(stream=PipeStream(), level="warning")
    with capture_logs() as events:
        get_logger("storage").debug("visible in capture", password="pw")
    assert events[0]["event"] == "visible in capture"
    assert events[0]["level"] == "debug"
    assert events[0]["password"] == REDACTED
    get_logger("storage").debug("after capture")  # level restored: filtered again
    assert len(events) == 1


def test_capture_logs_can_keep_configured_levels() -> None:
    configure_logging(stream=PipeStream(), level="warning")
    with capture_logs(min_level=None) as events:
        get_logger("s").info("filtered")
        get_logger("s").error("kept")
    assert [e["event"] for e in events] == ["kept"]


def test_counts_by_level_feed_metrics() -> None:
    service = LoggerService()
    service.configure(stream=PipeStream(), capture_stdlib=False)
    log = service.get_logger("m")
    log.info("a")
    log.error("b")
    log.error("c")
    log.debug("filtered")
    counts = service.counts()
    assert counts["info"] == 1
    assert counts["error"] == 2
    assert counts["debug"] == 0
    service.close()


def test_unserialisable_values_are_rendered_not_dropped(stream: PipeStream) -> None:
    get_logger("s").info("paths", path=Path("/x/y"), things={3, 1}, obj=object)
    event = lines(stream)[0]
    assert event["path"] == "/x/y"
    assert event["things"] == [1, 3]
    assert "object" in event["obj"]


class BrokenStream(io.StringIO):
    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_failing_sink_never_raises_into_the_caller(tmp_path: Path) -> None:
    service = LoggerService()
    service.configure(stream=BrokenStream(), capture_stdlib=False)
    log = service.get_logger("storage")
    log.info("repairing", path="model.bin")  # must not raise BrokenPipeError
    log.error("still fine")
    assert service.dropped == 2
    assert service.counts()["info"] == 1
    service.close()


def test_importing_kensho_leaves_stdlib_logging_alone() -> None:
    code = (
        "import logging, kensho.server, kensho.kernel, kensho.cli;"
        "from kensho.telemetry import get_logger; get_logger('x').info('hi');"
        "root = logging.getLogger(); print(len(root.handlers), root.level)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["0", str(logging.WARNING)]


@pytest.mark.parametrize(
    "key", ["time_to_first_token", "first_token_timeout", "time_per_token", "tokens_per_second"]
)
def test_token_timings_are_not_redacted(stream: PipeStream, key: str) -> None:
    get_logger("runtime").info("timing", **{key: 0.25})
    assert lines(stream)[0][key] == 0.25


def test_forced_console_format_has_no_colour_codes_off_a_terminal() -> None:
    out = PipeStream()
    configure_logging(stream=out, format="console")
    get_logger("cli").warning("plain text please")
    assert "\x1b[" not in out.getvalue()


LIBRARY_USER = """
import json, sys
from kensho.telemetry import configure_logging, get_logger
configure_logging(**json.loads(sys.argv[1]))
get_logger("storage").debug("storage debug")
get_logger("server").debug("server debug")
get_logger("server").info("server info")
"""


def library_user(tmp_path: Path, arguments: dict[str, Any], **env: str) -> list[str]:
    """Run a script that configures logging as a library user would; its events."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KENSHO_")}
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_USER, json.dumps(arguments)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**clean, **env},
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line)["event"] for line in done.stderr.splitlines()]


@pytest.mark.parametrize(
    ("env", "toml", "events"),
    [
        ({"KENSHO_LOG_LEVELS": "storage=debug"}, None, ["storage debug", "server info"]),
        ({"KENSHO_LOG_LEVEL": "debug"}, None, ["storage debug", "server debug", "server info"]),
        ({}, '[log]\nlevels = { server = "debug" }\n', ["server debug", "server info"]),
        ({}, None, ["server info"]),
    ],
)
def test_configure_logging_without_arguments_reads_the_cli_settings_sources(
    tmp_path: Path, env: dict[str, str], toml: str | None, events: list[str]
) -> None:
    if toml is not None:
        (tmp_path / "kensho.toml").write_text(toml)
    assert library_user(tmp_path, {}, **env) == events


def test_configure_logging_arguments_win_over_the_environment(tmp_path: Path) -> None:
    env = {"KENSHO_LOG_LEVEL": "debug", "KENSHO_LOG_LEVELS": "storage=debug"}
    # level is given, levels is not: the variable still applies to storage.
    assert library_user(tmp_path, {"level": "info"}, **env) == ["storage debug", "server info"]
    assert library_user(tmp_path, {"level": "info", "levels": {}}, **env) == ["server info"]


def test_configure_logging_with_settings_ignores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KENSHO_LOG_LEVEL", "debug")
    out = PipeStream()
    configure_logging(LogSettings(format="json"), stream=out)
    get_logger("server").debug("hidden")
    get_logger("server").info("shown")
    assert [e["event"] for e in lines(out)] == ["shown"]


def test_configure_logging_refuses_a_misspelt_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KENSHO_LOG_LEVLES", "storage=debug")
    with pytest.raises(ConfigError, match="did you mean KENSHO_LOG_LEVELS"):
        configure_logging(stream=PipeStream())
