"""Per-call cost of structured logging: Kensho vs its peers, in one run.

Each logger writes an INFO event with two context fields as one JSON line to its own
file (flushed per event, so nothing is lost on a crash), and is also called at DEBUG
while its minimum level is INFO (the filtered-out cost). Medians over rounds.

The OTLP export table (``--export-only`` prints it alone) compares three Kensho
services that log the same way, created side by side and measured in turn within
each round, so that a busy moment of a shared machine hits all three alike: export
off, export to a collector on 127.0.0.1 that answers 200, and export to a port where
nothing listens (every batch goes to the disk spool). Four measures each:

- caller's path: bursts of 400 calls, the export thread drained before each (what a
  log call pays when it does not meet a batch being encoded), wall clock and the
  calling thread's own CPU time (``time.thread_time``, which a machine busy with
  other processes does not inflate);
- back to back: calls as fast as possible, the batch thread encoding and sending
  every 512 records meanwhile (it takes the GIL from the caller), wall clock and
  the CPU of all threads per event, flush included (what export costs in total).

    .venv/bin/python bench/logging_bench.py [--calls 20000] [--rounds 7] [--export-only]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog
from loguru import logger as loguru_logger
from pythonjsonlogger.json import JsonFormatter

sys.path.insert(0, str(Path(__file__).parent))
from _table import machine_line, markdown_table, median_per_call
from kensho.config import LogSettings, TelemetrySettings
from kensho.telemetry import LoggerService, configure_logging, get_logger, log_service

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


def _closed_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _export_service(directory: Path, name: str, endpoint: str | None) -> LoggerService:
    telemetry = None
    if endpoint is not None:
        telemetry = TelemetrySettings(endpoint=endpoint, spool_dir=directory / f"spool-{name}")
    service = LoggerService()
    service.configure(
        LogSettings(file=directory / f"{name}.log", file_max_bytes=1 << 40),
        stderr=False,
        capture_stdlib=False,
        telemetry=telemetry,
    )
    return service


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
    parser.add_argument("--export-only", action="store_true", help="only the OTLP table")
    args = parser.parse_args()
    print(f"logging_bench: {args.calls} calls x {args.rounds} rounds, medians; {machine_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.export_only:
            print()
            print(_peer_table(Path(tmp), args.calls, args.rounds))
        print()
        print(_export_table(Path(tmp), args.calls, args.rounds))


def _peer_table(directory: Path, calls: int, rounds: int) -> str:
    results: list[tuple[str, float, float]] = []
    for name, setup in PEERS:
        log, info, debug = setup(directory)
        namespace = {"log": log}
        median_per_call(info, namespace, calls=2_000, rounds=1)  # warm-up
        t_info = median_per_call(info, namespace, calls=calls, rounds=rounds)
        t_debug = median_per_call(debug, namespace, calls=calls * 5, rounds=rounds)
        results.append((name, t_info, t_debug))
    loguru_logger.remove()
    log_service().close()
    best_peer_info = min(r[1] for r in results if not r[0].startswith("kensho"))
    rows = [
        (name, f"{t_info * 1e6:.2f}", f"{t_info / best_peer_info:.2f}x", f"{t_debug * 1e6:.3f}")
        for name, t_info, t_debug in results
    ]
    headers = ["logger", "INFO to file (µs/call)", "vs fastest peer", "filtered DEBUG (µs/call)"]
    return markdown_table(headers, rows)


_MEASURES = ("burst wall", "burst thread CPU", "back-to-back wall", "back-to-back CPU")


def _export_table(directory: Path, calls: int, rounds: int) -> str:
    """Export off / collector up / collector down, interleaved within every round."""
    collector = _start_collector()
    services = [
        ("kensho, export off", _export_service(directory, "off", None)),
        (
            "collector up",
            _export_service(directory, "up", f"http://127.0.0.1:{collector.server_address[1]}"),
        ),
        ("collector down (spool)", _export_service(directory, "down", _closed_url())),
    ]
    samples: dict[str, dict[str, list[float]]] = {
        name: {m: [] for m in _MEASURES} for name, _ in services
    }
    namespaces = {name: {"log": svc.get_logger("bench")} for name, svc in services}
    for name, _ in services:
        median_per_call(INFO, namespaces[name], calls=2_000, rounds=1)  # warm-up
    for _ in range(rounds):
        _one_round(samples, namespaces, services, calls)
    notes = []
    for name, service in services:
        if service.export is not None:
            stats = service.export.stats()
            notes.append(f"{name}: {stats.get('logs', stats)}")
        service.close()
    collector.shutdown()
    base_name = services[0][0]
    rows = []
    for name, _ in services:
        cells = [name]
        for measure in _MEASURES:
            values, base = samples[name][measure], samples[base_name][measure]
            added = "" if name == base_name else f" ({_added(values, base) * 1e6:+.2f})"
            cells.append(f"{statistics.median(values) * 1e6:.2f}{added} [{_spread(values)}]")
        rows.append(cells)
    headers = ["OTLP export, µs per INFO call: median (paired added) [p25-p75]", *_MEASURES]
    return markdown_table(headers, rows) + "\n\n" + "\n".join(notes)


def _one_round(
    samples: dict[str, dict[str, list[float]]],
    namespaces: dict[str, dict[str, Any]],
    services: list[tuple[str, LoggerService]],
    calls: int,
) -> None:
    """One sample of each measure for each service; bursts alternate service by service."""
    timers = (("burst wall", time.perf_counter), ("burst thread CPU", time.thread_time))
    for _ in range(5):
        for measure, timer in timers:
            for name, service in services:
                service.flush_export()
                samples[name][measure].append(_per_call(namespaces[name], 400, timer))
    for name, service in services:
        service.flush_export()
        samples[name]["back-to-back wall"].append(
            _per_call(namespaces[name], calls, time.perf_counter)
        )
        service.flush_export()
        started = time.process_time()  # every thread: the caller, the batch and spool threads
        _per_call(namespaces[name], calls, time.perf_counter)
        service.flush_export()  # what the calls left queued is part of their cost
        samples[name]["back-to-back CPU"].append((time.process_time() - started) / calls)


def _per_call(namespace: dict[str, Any], calls: int, timer: Callable[[], float]) -> float:
    return timeit.Timer(INFO, globals=namespace, timer=timer).timeit(calls) / calls


def _added(values: list[float], base: list[float]) -> float:
    """Median of the paired differences: sample i of a service minus sample i without
    export, taken moments apart, so a load change between rounds cancels out."""
    return statistics.median(v - b for v, b in zip(values, base, strict=True))


def _spread(values: list[float]) -> str:
    low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return f"{low * 1e6:.2f}-{high * 1e6:.2f}"


if __name__ == "__main__":
    main()
