"""Where rendered events go: a stream (stderr) or a size-rotated file.

Sinks receive finished lines. The service serialises calls to them under one lock,
so a line is always written whole, whatever the number of threads logging at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import orjson
import structlog

__all__ = ["RotatingFileSink", "Sink", "StreamSink", "render_console", "render_json"]

_JSON_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    """Serialise what orjson does not know: paths and sets as data, anything else by repr."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return repr(value)


def render_json(event_dict: dict[str, Any]) -> bytes:
    """One event as one JSON line (UTF-8, newline-terminated)."""
    return orjson.dumps(event_dict, default=_fallback, option=_JSON_OPTIONS)


_console_renderers: dict[bool, structlog.dev.ConsoleRenderer] = {}


def render_console(event_dict: dict[str, Any], *, colors: bool) -> bytes:
    """One event as a readable, optionally coloured line for a human at a terminal."""
    renderer = _console_renderers.get(colors)
    if renderer is None:
        renderer = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)
        _console_renderers[colors] = renderer
    text = renderer(None, event_dict.get("level", "info"), dict(event_dict))
    return (str(text) + "\n").encode("utf-8", "replace")


class Sink(Protocol):
    """A destination for rendered lines; ``format`` says which rendering it wants."""

    format: Literal["json", "console"]

    def write(self, line: bytes) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """Writes to a text stream; ``None`` means whatever ``sys.stderr`` is at write time.

    Resolving ``sys.stderr`` late keeps logs flowing when a test runner or a daemon
    swaps the stream after logging was configured.
    """

    def __init__(
        self, stream: IO[str] | None = None, *, format: Literal["json", "console"] = "json"
    ) -> None:
        self._stream = stream
        self.format = format

    def write(self, line: bytes) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            stream.flush()
            buffer.write(line)
            buffer.flush()
        else:
            stream.write(line.decode("utf-8", "replace"))
            stream.flush()

    def close(self) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.flush()


class RotatingFileSink:
    """Appends JSON lines to a file, rotating it at ``max_bytes``.

    On rotation ``app.log`` becomes ``app.log.1``, ``app.log.1`` becomes ``app.log.2``
    and so on; at most ``backups`` old files are kept (0: the file is truncated). The
    file is opened unbuffered in append mode, so every line reaches the kernel in one
    ``write`` and nothing logged before a crash is lost in a user-space buffer.
    """

    format: Literal["json", "console"] = "json"

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab", buffering=0)
        self._size = self._file.tell()

    def _rotate(self) -> None:
        self._file.close()
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
            self._file = self.path.open("ab", buffering=0)
        else:
            self._file = self.path.open("wb", buffering=0)
        self._size = 0

    def write(self, line: bytes) -> None:
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._size += len(line)

    def close(self) -> None:
        self._file.close()
