"""The ``kensho`` command's global behaviour: help, version, config, exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from _server_support import kensho_env, run_kensho
from kensho import __version__
from kensho.cli import ExitCode, app
from kensho.cli._serve_cmds import StatusView
from kensho.events import (
    IntegritySnapshot,
    QueueSnapshot,
    StatusSnapshot,
    StorageFileRepaired,
    TrafficSnapshot,
)

runner = CliRunner()
Completed = subprocess.CompletedProcess[str]


def kensho(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Completed:
    return run_kensho(*args, env=kensho_env(cwd, port=None, **(env or {})), cwd=cwd, timeout=60)


def test_help_teaches_commands_and_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "Exit codes" in result.output
    assert "config" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_config_show_json_redacts_the_api_key(tmp_path: Path) -> None:
    result = kensho("config", "show", "--json", cwd=tmp_path, env={"KENSHO_API_KEY": "very-secret"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["server"]["api_key"] == "[redacted]"
    assert "very-secret" not in result.stdout + result.stderr


def test_config_show_reads_kensho_toml_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "kensho.toml").write_text("[server]\nport = 8765\n")
    result = kensho("config", "show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "port = 8765" in result.stdout


def test_bad_config_exits_with_the_config_code_and_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "kensho.toml").write_text("[server]\nport = 'high'\n")
    result = kensho("config", "show", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG
    assert "server.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_log_option_is_a_config_error(tmp_path: Path) -> None:
    result = kensho("--log-level", "loud", "config", "show", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG
    assert "level" in result.stderr


def test_log_file_option_writes_json_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "k.log"
    result = kensho(
        "--log-level", "debug", "--log-file", str(log_file), "config", "show", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert log_file.exists()


def test_an_error_naming_a_path_that_looks_like_markup_prints_it_literally(
    tmp_path: Path,
) -> None:
    result = kensho("--config", "w[/]z[red]x[/red].toml", "config", "show", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "config file w[/]z[red]x[/red].toml does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_misspelt_variable_stops_every_command_with_the_config_code(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"a")
    out = tmp_path / "m.json"
    for command in (
        ["config", "show"],
        ["verify", "-r", str(tmp_path / "store")],
        ["manifest", "build", str(tmp_path / "src"), "-o", str(out)],
    ):
        result = kensho(*command, cwd=tmp_path, env={"KENSHO_SERVR_PORT": "1"})
        assert result.returncode == ExitCode.CONFIG, (command, result.stderr)
        assert (
            "error: KENSHO_SERVR_PORT: unknown variable, no setting has this name "
            "(did you mean KENSHO_SERVER_PORT?)"
        ) in result.stderr
        assert "Traceback" not in result.stderr
    assert not out.exists()  # stopped before doing anything
    assert not (tmp_path / "store").exists()


def test_documented_variables_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "custom.toml").write_text("[server]\nport = 8766\n")
    env = {
        "KENSHO_CONFIG": str(tmp_path / "custom.toml"),
        "KENSHO_API_KEY": "k-1234567",
        "KENSHO_LOG_LEVEL": "warning",
        "KENSHO_LOG_LEVELS": "storage=debug",
    }
    result = kensho("config", "show", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["server"]["port"] == 8766
    assert data["log"]["levels"] == {"storage": "debug"}


def test_status_view_shows_server_data_literally() -> None:
    """``kensho status`` draws what the server sends: messages hold file names."""
    view = StatusView()
    view.update(_snapshot(active_engine="[red]gpu[/red]"))
    view.update(StorageFileRepaired(path="w[/]z.bin", fetched=0, reused=0, sources=()))
    console = Console(record=True, width=200)
    console.print(view.render())
    text = console.export_text()
    assert "[red]gpu[/red]" in text
    assert "repaired w[/]z.bin: fetched 0 B from local data" in text


def _snapshot(active_engine: str) -> StatusSnapshot:
    return StatusSnapshot(
        model="m", engines=(active_engine,), active_engine=active_engine, degraded=False,
        overloaded=False, draining=False, breakers=(), tasks={},
        queue=QueueSnapshot(depth={}, capacity=1, max_queue_size=1, in_flight={}),
        traffic=TrafficSnapshot(tokens=0, completions=0, latency_seconds=0),
        integrity=IntegritySnapshot(status="ok", files={}, problems={}, offline=False,
                                    checked_at=None),
    )  # fmt: skip
