"""Library code never prints: output goes through logging or the CLI's rich consoles."""

from __future__ import annotations

import ast
from pathlib import Path

import kensho

SRC = Path(kensho.__file__).parent


def test_no_print_calls_anywhere_in_the_package() -> None:
    offenders = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    assert offenders == []


def test_the_scan_sees_the_package() -> None:
    assert (SRC / "telemetry" / "_service.py").exists()
