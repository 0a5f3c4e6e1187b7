"""The ``kensho`` command's global behaviour: help, version, config, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from kensho import __version__
from kensho.cli import ExitCode, app

runner = CliRunner()


def run_kensho(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KENSHO_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kensho", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


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
    result = run_kensho(
        "config", "show", "--json", cwd=tmp_path, env={"KENSHO_API_KEY": "very-secret"}
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["server"]["api_key"] == "[redacted]"
    assert "very-secret" not in result.stdout + result.stderr


def test_config_show_reads_kensho_toml_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "kensho.toml").write_text("[server]\nport = 8765\n")
    result = run_kensho("config", "show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "port = 8765" in result.stdout


def test_bad_config_exits_with_the_config_code_and_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "kensho.toml").write_text("[server]\nport = 'high'\n")
    result = run_kensho("config", "show", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG
    assert "server.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_log_option_is_a_config_error(tmp_path: Path) -> None:
    result = run_kensho("--log-level", "loud", "config", "show", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG
    assert "level" in result.stderr


def test_log_file_option_writes_json_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "k.log"
    result = run_kensho(
        "--log-level", "debug", "--log-file", str(log_file), "config", "show", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert log_file.exists()
