"""Shared helpers for the benchmarks: timing rounds and printing markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["machine_line", "markdown_table", "median_per_call", "process_cpu"]


def median_per_call(stmt: str, namespace: dict[str, Any], *, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the per-call time (seconds) of the statement ``stmt``.

    ``timeit`` compiles the statement into its loop, so no wrapper call is measured.
    """
    samples = timeit.Timer(stmt, globals=namespace).repeat(repeat=rounds, number=calls)
    return statistics.median(samples) / calls


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def machine_line() -> str:
    implementation = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{implementation}, {os.cpu_count()} CPUs, {platform.machine()}"


def process_cpu(pid: int) -> float:
    """CPU seconds every thread of process ``pid`` has run (``/proc/PID/task/*/schedstat``,
    in ns; a child engine's decode runs on a worker thread)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total / 1e9
