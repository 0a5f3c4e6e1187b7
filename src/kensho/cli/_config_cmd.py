"""``kensho config``: show the effective settings, so a user can see what applies."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kensho.cli._app import app, out_console, state

__all__ = ["config_app"]

config_app = typer.Typer(help="Inspect Kensho's settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """Print the settings in effect (defaults < kensho.toml < KENSHO_* variables).

    Secrets such as the API key are shown as [redacted].
    """
    from kensho.telemetry import REDACTED

    data = state().settings.model_dump(mode="json")
    if data.get("server", {}).get("api_key"):
        data["server"]["api_key"] = REDACTED
    headers = data.get("telemetry", {}).get("headers") or {}
    data["telemetry"]["headers"] = dict.fromkeys(headers, REDACTED)  # credentials, often
    if as_json:
        out_console.print_json(json.dumps(data))
        return
    for section, values in data.items():
        out_console.print(f"[bold]\\[{section}][/]")
        for key, value in values.items():
            if value is None:
                out_console.print(f"# {key} (not set)", highlight=False)
            else:
                out_console.print(f"{key} = {json.dumps(value)}", highlight=False, markup=False)
        out_console.print()
