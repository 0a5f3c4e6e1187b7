"""The ``kensho`` Typer application, its global options and exit codes.

Command modules import :data:`app` and register their commands on it; the package
``__init__`` imports them. Start-up cost is paid by every invocation (and every
end-to-end test), so this module and the command modules import at module level only
what declaring the commands needs (typer, rich's console); the settings (pydantic),
logging (structlog) and each command's implementation load when a command runs.

Errors from the library (:class:`KenshoError`) are turned into one readable line on
stderr and a documented exit code, never a traceback.
"""

from __future__ import annotations

import enum
import io
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.text import Text

from kensho._env import CONFIG_FILE_ENV
from kensho.errors import (
    ConfigError,
    DiskSpaceError,
    IntegrityError,
    KenshoError,
    SignatureError,
    StoreBusyError,
)

if TYPE_CHECKING:
    from kensho.config import LogSettings, Settings

__all__ = [
    "ExitCode",
    "State",
    "app",
    "err_console",
    "labelled",
    "main",
    "out_console",
    "plain",
    "run_async",
    "state",
]


class ExitCode(enum.IntEnum):
    """Exit codes of every ``kensho`` command (also listed in ``kensho --help``)."""

    OK = 0
    FAILED = 1  # the command ran, and what it checked is not good
    USAGE = 2  # bad arguments
    CONFIG = 3  # invalid settings file or KENSHO_* variable
    INTEGRITY = 4  # required files missing or corrupt and not repairable
    DISK_SPACE = 5  # not enough free space for a repair or update
    SIGNATURE = 6  # the manifest failed a trust check
    BUSY = 7  # another process holds the store lock (--no-wait)
    ERROR = 10  # any other Kensho error
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODES_HELP = (
    "Exit codes: 0 ok · 1 check failed · 2 bad usage · 3 bad config · 4 integrity "
    "error · 5 not enough disk space · 6 signature/trust error · 7 store busy · "
    "10 other error · 130 interrupted."
)

out_console = Console()
err_console = Console(stderr=True)


def plain(value: object, style: str = "") -> Text:
    """``value`` as literal text, for a line, a table cell or a title.

    Rich reads ``[...]`` in a plain ``str`` as markup: a legal file name such as
    ``w[/]z.bin`` would raise ``MarkupError`` and ``[green]ok[/green]`` would be drawn as
    styling (display spoofing). Data (paths, messages, names) is therefore always
    wrapped in :class:`~rich.text.Text`, never formatted into a markup string.
    """
    return Text(str(value), style=style)


_T = TypeVar("_T")


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)``: asyncio loads only for the commands that run a loop."""
    import asyncio

    return asyncio.run(main)


def labelled(label: str, style: str, message: object) -> Text:
    """A styled ``label`` (``error:``) followed by ``message`` as literal text."""
    return Text.assemble((label, style), " ", str(message))


@dataclass
class State:
    """What the global options resolved to, shared with every command."""

    settings: Settings
    config_path: Path | None


_state: State | None = None


def state() -> State:
    """The resolved global state; loads defaults if the callback did not run."""
    global _state  # noqa: PLW0603 - one CLI invocation per process
    if _state is None:
        from kensho.config import load_settings

        _state = State(settings=load_settings(), config_path=None)
    return _state


app = typer.Typer(
    name="kensho",
    help=(
        "Kensho keeps a local AI application alive with no network and no babysitting: "
        "it verifies and repairs its files, serves inference behind a circuit breaker "
        "with a CPU fallback, and logs everything as structured JSON.\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    # Plain click help: rich markup would eat bracketed words ("the [trust] keys list")
    # and typer's rich panels show flags as "--once <bool>".
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from kensho import __version__

        out_console.print(f"kensho {__version__}")
        raise typer.Exit


@app.callback()
def _global(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Settings file (TOML). Default: ./kensho.toml when it exists.",
            envvar=CONFIG_FILE_ENV,
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="Minimum log level: debug, info, warning, error, critical."),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(help="Log format on stderr: auto (console on a terminal), json, console."),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Also write JSON logs to this file (rotated).")
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Global options apply to every command."""
    global _state  # noqa: PLW0603 - one CLI invocation per process
    from kensho.config import LogSettings, load_settings
    from kensho.telemetry import configure_logging

    settings = load_settings(config)
    asked = log_level is not None or "level" in settings.log.model_fields_set
    overrides = {
        k: v
        for k, v in {"level": log_level, "format": log_format, "file": log_file}.items()
        if v is not None
    }
    log = settings.log
    if overrides:
        try:
            log = LogSettings.model_validate({**log.model_dump(), **overrides})
        except ValueError as exc:
            raise ConfigError(f"invalid logging option: {exc}") from None
        settings = settings.model_copy(update={"log": log})
    configure_logging(
        _quiet_on_a_terminal(log, asked=asked),
        stream=cast(IO[str], _LiveStderr()),
        telemetry=settings.telemetry,
    )
    _state = State(settings=settings, config_path=config)


def _quiet_on_a_terminal(log: LogSettings, *, asked: bool) -> LogSettings:
    """On a terminal, logs show warnings and above unless a level was asked for.

    There the commands draw every event as one human line (and progress bars); info
    logs would say each thing a second time. Off a terminal (a service, a pipe) and with
    a log file, the JSON logs are the record and keep their level.
    """
    if asked or log.file is not None or log.format == "json" or not sys.stderr.isatty():
        return log
    return log.model_copy(update={"level": "warning"})


class _LiveStderr(io.TextIOBase):
    """``sys.stderr`` as it is at each write, written as text.

    While progress bars are live, rich swaps ``sys.stderr`` for a proxy that prints
    each line above the bars; a log line written to the raw stream instead would be
    glued to the end of a bar (``…0:00:002026-12-01T08:16:22Z [warning…``).
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def exit_code_for(error: KenshoError) -> ExitCode:
    """Map an error family to its documented exit code."""
    table: list[tuple[type[KenshoError], ExitCode]] = [
        (ConfigError, ExitCode.CONFIG),
        (IntegrityError, ExitCode.INTEGRITY),
        (DiskSpaceError, ExitCode.DISK_SPACE),
        (SignatureError, ExitCode.SIGNATURE),
        (StoreBusyError, ExitCode.BUSY),
    ]
    for cls, code in table:
        if isinstance(error, cls):
            return code
    return ExitCode.ERROR


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KenshoError as exc:
        err_console.print(labelled("error:", "bold red", exc), soft_wrap=True)  # one greppable line
        sys.exit(int(exit_code_for(exc)))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))
