"""Per-call cost of structured logging: Kensho vs its peers, in one run.

Each logger writes an INFO event with two context fields as one JSON line to its own
file (flushed per event, so nothing is lost on a crash), and is also called at DEBUG
while its minimum level is INFO (the filtered-out cost). Medians over rounds.

Two more Kensho rows add OTLP export (``[telemetry]``): to a collector on 127.0.0.1
that answers 200, and to a port where nothing listens (every batch goes to the disk
spool), each measured two ways: bursts of 400 calls with the export threads idle
(the caller's path: queueing the finished event; a batch thread wakes at 512 queued
or after 1 s) and back-to-back calls, where the
converter and export threads compete for the GIL (about 50 µs of Python per record
to build, encode and send it, off the caller's thread but not off the interpreter).

    .venv/bin/python bench/logging_bench.py [--calls 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog
from loguru import logger as loguru_logger
from pythonjsonlogger.json import JsonFormatter

sys.path.insert(0, str(Path(__file__).parent))
from _table import machine_line, markdown_table, median_per_call
from kensho.config import TelemetrySettings
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


class _Collector(BaseHTTPRequestHandler):
    """Accepts any OTLP request (reads it whole, answers 200)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _start_collector() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kensho_export(directory: Path, endpoint: str, name: str) -> Setup:
    telemetry = TelemetrySettings(endpoint=endpoint, spool_dir=directory / f"spool-{name}")
    configure_logging(
        stderr=False, telemetry=telemetry, file=directory / f"{name}.log", file_max_bytes=1 << 40
    )
    return get_logger("bench"), INFO, DEBUG


def kensho_collector_up_setup(directory: Path) -> Setup:
    server = _start_collector()
    return _kensho_export(directory, f"http://127.0.0.1:{server.server_address[1]}", "up")


def kensho_collector_down_setup(directory: Path) -> Setup:
    return _kensho_export(directory, f"http://127.0.0.1:{_closed_port()}", "down")


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
    ("kensho + OTLP export, collector up", kensho_collector_up_setup),
    ("kensho + OTLP export, collector down (spool)", kensho_collector_down_setup),
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
    notes: list[str] = []
    bursts: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name, setup in PEERS:
            log, info, debug = setup(directory)
            namespace = {"log": log}
            median_per_call(info, namespace, calls=2_000, rounds=1)  # warm-up
            t_info = median_per_call(info, namespace, calls=args.calls, rounds=args.rounds)
            t_debug = median_per_call(debug, namespace, calls=args.calls * 5, rounds=args.rounds)
            export = log_service().export
            if name.startswith("kensho"):  # the same bursts for kensho alone: the baseline
                bursts.append((name, _burst(info, namespace, export, args.rounds), t_info))
            if export is not None:
                export.flush()
                notes.append(f"{name}: {export.stats()}")
                log_service().close()
                continue
            results.append((name, t_info, t_debug))
        log_service().close()
        loguru_logger.remove()
    best_peer_info = min(r[1] for r in results if not r[0].startswith("kensho"))
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
    base = bursts[0][1]
    print()
    print(
        markdown_table(
            [
                f"OTLP export (kensho alone: {base * 1e6:.2f} µs/call in the same bursts)",
                "caller's path (µs/call)",
                "added",
                "back to back (µs/call)",
            ],
            [
                (name, f"{b * 1e6:.2f}", f"{(b - base) * 1e6:+.2f}", f"{t * 1e6:.2f}")
                for name, b, t in bursts[1:]
            ],
        )
    )
    print()
    for note in notes:
        print(note)


def _burst(stmt: str, namespace: dict[str, Any], export: Any, rounds: int) -> float:
    """Median per-call time of 400-call bursts, the export threads drained before each."""
    samples = []
    for _ in range(rounds * 5):
        if export is not None:
            export.flush()
        samples.append(median_per_call(stmt, namespace, calls=400, rounds=1))
    return statistics.median(samples)


if __name__ == "__main__":
    main()
