"""The ``kensho`` command. Each sub-command lives in its own module, imported here.

Importing a command module declares its commands only; what a command runs on is
imported when it runs (docs/architecture.md, "Start-up").
"""

from __future__ import annotations

from kensho.cli import _config_cmd, _serve_cmds, _share_cmd, _signing_cmds, _storage_cmds
from kensho.cli._app import ExitCode, app, main

__all__ = ["ExitCode", "app", "main"]

_COMMAND_MODULES = (_config_cmd, _storage_cmds, _signing_cmds, _serve_cmds, _share_cmd)
