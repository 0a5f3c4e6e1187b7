"""Reading a Kensho server over HTTP: metrics, server-sent events, drain refusals.

One set of helpers for the in-process tests (httpx over ASGI) and the ``kensho up``
subprocess tests alike (see ``_server_support.py`` for starting the subprocess).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator

import httpx


def metric(text: str, name: str) -> float:
    """The value of one sample line of the Prometheus text.

    A labelled child that never counted is not exposed yet: it reads as 0. An
    unlabelled metric always is, so a missing one is an error that names it.
    """
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if "{" in name:
        return 0.0
    raise AssertionError(f"no sample {name}")


def server_metric(url: str, name: str) -> float:
    """:func:`metric` read from a running server's ``/metrics``."""
    return metric(httpx.get(url + "/metrics").text, name)


def wait_for_metric(url: str, name: str, value: float, *, seconds: float = 20.0) -> float:
    """Read /metrics until ``name`` reaches ``value`` (each read is a real round trip)."""
    deadline = time.monotonic() + seconds
    seen = 0.0
    while time.monotonic() < deadline:
        seen = server_metric(url, name)
        if seen >= value:
            break
    return seen


async def wait_for_queue_depth(client: httpx.AsyncClient, depth: int) -> None:
    """Read /metrics until ``depth`` normal tasks wait in the queue (real round trips)."""
    name = 'kensho_queue_depth{priority="normal"}'
    while metric((await client.get("/metrics")).text, name) < depth:
        pass


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of a whole SSE body, in order (``[DONE]`` included)."""
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(kind, data)`` per named event of an SSE line stream (the status stream's form)."""
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, line.removeprefix("data: ")


def status_events_until(url: str, kind: str) -> list[dict[str, object]]:
    """Read the status stream (it replays recent events) until an event of ``kind``;
    every event but the snapshots, that one included."""
    seen: list[dict[str, object]] = []
    with httpx.stream("GET", url + "/v1/kensho/status", timeout=30) as response:
        for current, data in sse_events(response.iter_lines()):
            if current != "snapshot":
                seen.append(json.loads(data))
                if current == kind:
                    return seen
    raise AssertionError(f"the status stream ended before {kind}: {seen}")


def assert_shutting_down(r: httpx.Response, code: str = "draining") -> None:
    """A 503 a client can act on: OpenAI error body, Retry-After, connection closed."""
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error"
    assert error["code"] == code
    assert "shutting down" in error["message"]
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["connection"] == "close"
