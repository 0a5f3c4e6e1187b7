"""Per-call cost of structured logging: Kensho vs its peers, in one run.

Each logger writes an INFO event with two context fields as one JSON line to its own
file (flushed per event, so nothing is lost on a crash), and is also called at DEBUG
while its minimum level is INFO (the filtered-out cost). Medians over rounds.

    .venv/bin/python bench/logging_bench.py [--calls 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from loguru import logger as loguru_logger
from pythonjsonlogger.json import JsonFormatter

sys.path.insert(0, str(Path(__file__).parent))
from _table import machine_line, markdown_table, median_per_call
from kensho.telemetry import configure_logging, get_logger, log_service

# Each setup returns the logger object; the statements below call it.
INFO = 'log.info("request handled", user="alice", status=200)'
DEBUG = 'log.debug("request handled", user="alice", status=200)'
STDLIB_INFO = 'log.info("request handled", extra={"user": "alice", "status": 200})'
STDLIB_DEBUG = 'log.debug("request handled", extra={"user": "alice", "status": 200})'
Setup = tuple[Any, str, str]


def kensho_setup(directory: Path) -> Setup:
    configure_logging(stderr=False, file=directory / "kensho.log", file_max_bytes=1 << 40)
    return get_logger("bench"), INFO, DEBUG


def stdlib_json_setup(directory: Path) -> Setup:
    log = logging.getLogger("bench.stdlib")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(directory / "stdlib.log")
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(handler)
    return log, STDLIB_INFO, STDLIB_DEBUG


def structlog_stdlib_setup(directory: Path) -> Setup:
    std = logging.getLogger("bench.structlog")
    std.propagate = False
    std.setLevel(logging.INFO)
    handler = logging.FileHandler(directory / "structlog.log")
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    std.addHandler(handler)
    log = structlog.wrap_logger(
        std,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return log, INFO, DEBUG


def loguru_setup(directory: Path) -> Setup:
    loguru_logger.remove()
    loguru_logger.add(directory / "loguru.log", serialize=True, level="INFO")
    return loguru_logger, INFO, DEBUG


PEERS: list[tuple[str, Callable[[Path], Setup]]] = [
    ("kensho (structlog + orjson)", kensho_setup),
    ("stdlib logging + python-json-logger", stdlib_json_setup),
    ("structlog → stdlib (ProcessorFormatter)", structlog_stdlib_setup),
    ("loguru serialize=True", loguru_setup),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    results: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name, setup in PEERS:
            log, info, debug = setup(directory)
            namespace = {"log": log}
            median_per_call(info, namespace, calls=2_000, rounds=1)  # warm-up
            t_info = median_per_call(info, namespace, calls=args.calls, rounds=args.rounds)
            t_debug = median_per_call(debug, namespace, calls=args.calls * 5, rounds=args.rounds)
            results.append((name, t_info, t_debug))
        log_service().close()
        loguru_logger.remove()
    best_peer_info = min(r[1] for r in results[1:])
    rows = [
        (
            name,
            f"{t_info * 1e6:.2f}",
            f"{t_info / best_peer_info:.2f}x",
            f"{t_debug * 1e6:.3f}",
        )
        for name, t_info, t_debug in results
    ]
    print(f"logging_bench: {args.calls} calls x {args.rounds} rounds, medians; {machine_line()}")
    print()
    print(
        markdown_table(
            ["logger", "INFO to file (µs/call)", "vs fastest peer", "filtered DEBUG (µs/call)"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
