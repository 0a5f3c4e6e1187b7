"""structlog processors that give every Kensho event the same shape.

Each processor is a plain callable ``(logger, method_name, event_dict) -> event_dict``,
so they can be reused in any structlog chain and tested on their own.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

__all__ = [
    "REDACTED",
    "add_header",
    "error_to_dict",
    "format_exc_info",
    "is_secret_key",
    "redact_secrets",
    "utc_timestamp",
]

REDACTED = "[redacted]"

_METHOD_TO_LEVEL = {
    "debug": "debug",
    "info": "info",
    "msg": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
    "fatal": "critical",
}

_clock_cache: tuple[int, str] = (-1, "")


def utc_timestamp(now: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds (``2026-11-25T10:00:00.123Z``).

    The second-resolution prefix is cached: formatting a date is the slowest part of
    a timestamp and changes once a second.
    """
    global _clock_cache  # noqa: PLW0603 - a one-slot cache replaced atomically
    t = _time() if now is None else now
    sec = int(t)
    cached_sec, prefix = _clock_cache
    if sec != cached_sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        _clock_cache = (sec, prefix)
    return prefix + _MILLIS[int((t - sec) * 1000)]


_time = time.time
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))


def add_header(_: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """Put ``timestamp``, ``level``, ``service`` and ``event`` first, then the context."""
    header: dict[str, Any] = {
        "timestamp": utc_timestamp(),
        "level": _METHOD_TO_LEVEL.get(method_name, method_name),
        "service": event_dict.pop("service", "kensho"),
        "event": event_dict.pop("event", ""),
    }
    header.update(event_dict)
    return header


# Secret-looking keys. Compared on the lower-cased key split into words, so that
# ``access_token``, ``X-Api-Key`` and ``apiKey`` match while ``tokens`` or
# ``max_tokens`` (counts, not secrets) do not: the original matched neither way.
_SECRET_WORDS = frozenset(
    {"password", "passwd", "pwd", "token", "secret", "authorization", "apikey", "cookie"}
)
_SECRET_JOINED = ("apikey", "password", "secret", "privatekey", "accesskey")
_SPLIT = re.compile(r"[^a-z0-9]+")
_secret_cache: dict[str, bool] = {}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# "token" in a timing or a count is about generated tokens, not credentials:
# time_to_first_token, first_token_timeout, time_per_token, tokens_per_second.
_TOKEN_TIMING = frozenset({"first", "per", "last", "next", "each", "timeout", "time", "ttft"})


def _is_token_timing(words: list[str], index: int) -> bool:
    neighbours = set(words[max(0, index - 1) : index]) | set(words[index + 1 : index + 2])
    return bool(neighbours & _TOKEN_TIMING)


_CONTAINERS = (dict, list, tuple)


def is_secret_key(key: str) -> bool:
    """Whether a context key names a secret whose value must never reach a log."""
    cached = _secret_cache.get(key)
    if cached is not None:
        return cached
    lowered = key.lower()
    words = [w for w in _SPLIT.split(_CAMEL.sub("_", key).lower()) if w]
    joined = "".join(w for w in _SPLIT.split(lowered) if w)
    secret = any(
        w in _SECRET_WORDS and not (w == "token" and _is_token_timing(words, i))
        for i, w in enumerate(words)
    ) or any(j in joined for j in _SECRET_JOINED)
    if len(_secret_cache) < 4096:
        _secret_cache[key] = secret
    return secret


def _redact_value(value: Any, depth: int) -> Any:
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_key(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, _CONTAINERS):
        return [_redact_value(v, depth + 1) for v in value]
    return value


def redact_secrets(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace values of secret-looking keys, at any depth, with ``"[redacted]"``.

    This runs on every event, so the common case (a known, harmless key holding a
    scalar) costs one dict lookup and one type check.
    """
    cache = _secret_cache
    for key, value in event_dict.items():
        secret = cache.get(key)
        if secret is None:
            secret = is_secret_key(key)
        if secret:
            event_dict[key] = REDACTED
        elif type(value) in _CONTAINERS:
            event_dict[key] = _redact_value(value, 0)
    return event_dict


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def error_to_dict(exc: BaseException, *, _depth: int = 0) -> dict[str, Any]:
    """An exception as ``{type, message, stack, cause?}``; frames, never local variables."""
    frames = [
        {"file": f.filename, "line": f.lineno, "function": f.name, "code": f.line}
        for f in traceback.extract_tb(exc.__traceback__)
    ]
    error: dict[str, Any] = {"type": _type_name(exc), "message": str(exc), "stack": frames}
    cause = exc.__cause__
    if cause is None and not exc.__suppress_context__:
        cause = exc.__context__
    if cause is not None and _depth < 8:
        error["cause"] = error_to_dict(cause, _depth=_depth + 1)
    return error


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exception_from(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1] if len(exc_info) == 3 else None
    if exc_info:
        return sys.exc_info()[1]
    return None


def format_exc_info(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Turn ``exc_info`` (from ``logger.exception`` or ``exc_info=...``) into ``error``."""
    if "exc_info" in event_dict:
        exc = _exception_from(event_dict.pop("exc_info"))
        if exc is not None:
            event_dict["error"] = error_to_dict(exc)
    return event_dict
