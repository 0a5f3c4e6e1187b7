"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package that re-exports its public names from its submodules imports all of them,
and everything they import, as soon as any one of its submodules is imported: asking
for ``kensho.storage._cdc`` ran the whole store (sources, httpx, manager). With a
name→module table the package stays cheap and each name loads on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str,
    namespace: dict[str, Any],
    exports: Mapping[str, str],
    public: Iterable[str],
    computed: Mapping[str, Callable[[], Any]] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    ``exports`` maps each public name to the module that defines it, ``computed`` a name
    to the function that makes its value (``__version__``); ``namespace`` is the
    package's ``globals()``, where a loaded name is cached so that ``__getattr__`` runs
    once per name. Assign the pair under ``if not TYPE_CHECKING:`` (``__getattr__, __dir__
    = lazy_exports(...)``): a module ``__getattr__`` that mypy sees makes every unknown
    name ``Any``; hidden from it, mypy types the names the package imports under
    ``TYPE_CHECKING`` and a misspelt one stays an error.
    """
    makers = dict(computed or {})
    names = sorted({*public, *exports, *makers})

    def __getattr__(name: str) -> Any:
        if name in makers:
            value = makers[name]()
        elif name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
