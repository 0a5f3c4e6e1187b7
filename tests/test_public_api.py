"""The public names load on first use, and start-up loads only what a command needs.

``kensho`` and ``kensho.storage`` re-export their names lazily (PEP 562): every name of
``__all__`` must still import, be the object its module defines, and be listed by
``dir()``. Every ``kensho`` invocation (and every end-to-end test) pays for what start-up
imports, so the real command is run with ``PYTHONPROFILEIMPORTTIME`` and the modules it
loaded are checked: no server stack, no HTTP client, no store, no runtime for ``--help``,
and no settings or logging either until a command runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

import kensho
import kensho.storage
from _server_support import clean_env, run_kensho

PACKAGES = [
    pytest.param(kensho, {"__version__"}, id="kensho"),
    pytest.param(kensho.storage, set(), id="kensho.storage"),
]

# Loaded only by the commands that use them (each is 20 ms to 0.3 s of start-up).
_IMPLEMENTATION = {
    "fastapi",
    "httpx",
    "uvicorn",
    "starlette",
    "torch",
    "llama_cpp",
    "llguidance",
    "fsspec",
    "opentelemetry",
    "cryptography",
    "kensho.events",
    "kensho.kernel",
    "kensho.runtime",
    "kensho.server",
    "kensho.storage.manager",
    "kensho.storage.sources",
}
# Loaded by the global options of every command, never by --help or --version alone.
_SETTINGS_AND_LOGGING = {"pydantic", "structlog", "kensho.config", "kensho.telemetry"}


@pytest.mark.parametrize(("package", "computed"), PACKAGES)
def test_every_public_name_imports(package: ModuleType, computed: set[str]) -> None:
    exports: dict[str, str] = package._EXPORTS
    assert set(package.__all__) == set(exports) | computed  # nothing public without a home
    for name in package.__all__:
        namespace: dict[str, object] = {}
        exec(f"from {package.__name__} import {name}", namespace)  # the user's spelling
        assert namespace[name] is getattr(package, name)
        if name in exports:  # the very object its module defines, not a copy
            assert namespace[name] is getattr(importlib.import_module(exports[name]), name)
        assert name in dir(package)


def test_version_is_the_package_metadata() -> None:
    from importlib.metadata import version

    assert kensho.__version__ == version("kensho")


@pytest.mark.parametrize("package", [kensho, kensho.storage], ids=["kensho", "kensho.storage"])
def test_unknown_name_is_an_attribute_error(package: ModuleType) -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Settngs'"):
        _ = package.Settngs
    with pytest.raises(ImportError, match="Settngs"):
        exec(f"from {package.__name__} import Settngs", {})


def _loaded_by(tmp_path: Path, *args: str) -> set[str]:
    """Every module the real ``kensho ARGS`` imported (Python's own import profile)."""
    result = run_kensho(*args, cwd=tmp_path, env=clean_env(PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert lines, "no import profile on stderr"
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # [0] is the header


def _top_and_full(modules: set[str]) -> set[str]:
    return modules | {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("args", [("--help",), ("--version",)])
def test_help_and_version_load_no_settings_and_no_implementation(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    loaded = _top_and_full(_loaded_by(tmp_path, *args))
    assert "kensho.cli" in loaded  # the profile is of the command, not of something else
    assert loaded.isdisjoint(_IMPLEMENTATION | _SETTINGS_AND_LOGGING), sorted(
        loaded & (_IMPLEMENTATION | _SETTINGS_AND_LOGGING)
    )


@pytest.mark.parametrize(
    "args", [("status", "--help"), ("manifest", "build", "--help"), ("share", "--help")]
)
def test_command_help_loads_settings_but_no_implementation(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A command's ``--help`` runs the global options (settings, logging) and no more."""
    loaded = _top_and_full(_loaded_by(tmp_path, *args))
    assert {"kensho.config", "kensho.telemetry"} <= loaded
    assert loaded.isdisjoint(_IMPLEMENTATION), sorted(loaded & _IMPLEMENTATION)
