"""Environment variable names, in a module that imports nothing.

``kensho.config`` defines the settings (pydantic, ~0.1 s to import); the CLI needs
the name of the settings-file variable to declare ``--config`` before any command
runs, including ``kensho --help``, which never loads the settings.
"""

from __future__ import annotations

__all__ = ["CONFIG_FILE_ENV", "ENV_PREFIX"]

ENV_PREFIX = "KENSHO_"
CONFIG_FILE_ENV = "KENSHO_CONFIG"  # the settings file, when --config is not given
