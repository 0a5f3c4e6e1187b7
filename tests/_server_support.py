"""Start a real ``kensho up`` subprocess on a free port, and stop it for sure."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOOT_TIMEOUT = 60.0


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    stderr_lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def wait_for_stderr(self, text: str, timeout: float = 30.0) -> str:
        """Block until a new stderr line contains ``text`` (an observable event)."""
        while True:
            try:
                line = self.stderr_lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no stderr line with {text!r} in {timeout:g} s") from None
            if line is None:
                raise AssertionError(f"kensho up ended before logging {text!r}")
            if text in line:
                return line

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its KENSHO_* variables, plus ``extra``.

    Why: an unknown KENSHO_* variable stops every command, and a known one would
    change what the test runs; a test sets the ones it means.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("KENSHO_")}
    env.update(extra)
    return env


def kensho_env(data_home: Path, *, port: str | None = "0", **extra: str) -> dict[str, str]:
    """The environment of a served ``kensho``: :func:`clean_env`, the store under
    ``data_home``, JSON logs, and ``up`` picking a free port."""
    env = clean_env(XDG_DATA_HOME=str(data_home), KENSHO_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    if port is not None:
        env["KENSHO_SERVER_PORT"] = port
    env.update(extra)
    return env


def kensho_argv(*args: str | Path) -> list[str]:
    """The command line of ``kensho ARGS`` in this interpreter (so ``PYTHONPATH`` holds)."""
    return [sys.executable, "-m", "kensho", *map(str, args)]


def kensho_popen(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """Start ``kensho ARGS`` (the one way tests start it); ``env`` defaults to
    :func:`clean_env`. ``popen``: the pipes and the rest, as for ``subprocess.Popen``."""
    return subprocess.Popen(
        kensho_argv(*args),
        cwd=cwd,
        env=clean_env() if env is None else env,
        **popen,
    )


def _pump(stream: object, sink: list[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line)
        lines.put(line)
    lines.put(None)


def run_kensho(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``kensho ARGS`` to the end, output captured (see :func:`kensho_popen`)."""
    return subprocess.run(
        kensho_argv(*args),
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def kensho_up(*args: str, env: dict[str, str], cwd: Path) -> Iterator[Server]:
    """Run ``kensho up``; yield once it prints where it listens; always stop it."""
    process = kensho_popen(
        "up", *args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out_lines: queue.Queue[str | None] = queue.Queue()
    server = Server(process, url="")
    threads = [
        threading.Thread(target=_pump, args=(process.stdout, server.stdout, out_lines)),
        threading.Thread(target=_pump, args=(process.stderr, server.stderr, server.stderr_lines)),
    ]
    for thread in threads:
        thread.daemon = True
        thread.start()
    try:
        while True:
            try:
                line = out_lines.get(timeout=BOOT_TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    "kensho up did not start in time:\n" + "".join(server.stderr)
                ) from None
            if line is None:
                process.wait(timeout=30)
                raise AssertionError(
                    f"kensho up exited with {process.returncode}:\n" + "".join(server.stderr)
                )
            if line.startswith("kensho: listening on "):
                server.url = line.split()[-1]
                break
        yield server
    finally:
        server.stop()
        for thread in threads:
            thread.join(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
