"""What trips a breaker: sliding windows of call outcomes, and the settings check.

The failure rate is computed over either the last N calls (a ring buffer with
running totals) or the last N seconds (ten buckets, so aging is +-10 %); both keep
integer counts, so the breaker compares the rate exactly. :func:`check_settings`
refuses, naming the setting, what the breaker could not honour.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["CountWindow", "TimeWindow", "check_settings"]


class CountWindow:
    """The outcomes of the last ``size`` calls, as a ring buffer with running totals."""

    __slots__ = ("_buf", "_i", "calls", "failures", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf = bytearray(size)
        self._i = 0
        self.calls = 0
        self.failures = 0

    def add(self, failed: bool, now: float) -> None:
        i = self._i
        if self.calls == self.size:
            self.failures -= self._buf[i]
        else:
            self.calls += 1
        self._buf[i] = failed
        self.failures += failed
        self._i = i + 1 if i + 1 < self.size else 0

    def refresh(self, now: float) -> None:
        """Count windows do not age."""

    def clear(self) -> None:
        self._buf = bytearray(self.size)
        self._i = self.calls = self.failures = 0

    def describe(self) -> str:
        return f"the last {self.calls} calls"


class TimeWindow:
    """Outcomes of the last ``span`` seconds, in ten buckets (so aging is ±10 %)."""

    __slots__ = ("_buckets", "_width", "calls", "failures", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._width = span / 10
        self._buckets: deque[list[float]] = deque()
        self.calls = 0
        self.failures = 0

    def refresh(self, now: float) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] + self._width <= now - self.span:
            _, calls, failures = buckets.popleft()
            self.calls -= int(calls)
            self.failures -= int(failures)

    def add(self, failed: bool, now: float) -> None:
        self.refresh(now)
        buckets = self._buckets
        if not buckets or now >= buckets[-1][0] + self._width:
            buckets.append([now - (now % self._width), 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        self.calls += 1
        if failed:
            bucket[2] += 1
            self.failures += 1

    def clear(self) -> None:
        self._buckets.clear()
        self.calls = self.failures = 0

    def describe(self) -> str:
        return f"the last {self.span:g} s ({self.calls} calls)"


def check_settings(
    *,
    failure_threshold: int,
    success_threshold: int,
    half_open_max_calls: int,
    open_duration: float,
    open_duration_multiplier: float,
    max_open_duration: float | None,
    failure_rate_threshold: float | None,
    window_type: str,
    window_size: float,
    minimum_calls: int,
) -> None:
    """Refuse settings the breaker could not honour, naming the setting."""
    for name, count in (
        ("failure_threshold", failure_threshold),
        ("success_threshold", success_threshold),
        ("half_open_max_calls", half_open_max_calls),
        ("minimum_calls", minimum_calls),
    ):
        if count < 1:
            raise ValueError(f"{name} must be >= 1, got {count}")
    for name, seconds in (
        ("open_duration", open_duration),
        ("max_open_duration", max_open_duration),
    ):
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"{name} must be a finite number of seconds > 0, got {seconds}")
    if not (math.isfinite(open_duration_multiplier) and open_duration_multiplier >= 1):
        raise ValueError(
            f"open_duration_multiplier must be a finite number >= 1, got {open_duration_multiplier}"
        )
    if failure_rate_threshold is not None and not 0 < failure_rate_threshold <= 1:
        raise ValueError(
            f"failure_rate_threshold is a fraction in (0, 1], got {failure_rate_threshold}"
        )
    if window_type not in ("count", "time"):
        raise ValueError(f"window_type must be 'count' or 'time', got {window_type!r}")
    if not (math.isfinite(window_size) and window_size > 0):
        raise ValueError(f"window_size must be > 0, got {window_size}")
    if window_type == "count" and window_size != int(window_size):
        raise ValueError(
            f"window_size of a count window is a number of calls (a whole number), "
            f"got {window_size}"
        )
