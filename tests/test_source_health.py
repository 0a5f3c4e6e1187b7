"""What one source may cost a run, on virtual time: minimum rate, abandonment, probe.

The HTTP traffic here goes through httpx's ``MockTransport`` so that a server can
"take" minutes of virtual time per byte; the same defences against real servers on
127.0.0.1 and through the ``kensho`` command are in ``test_source_failover.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from kensho.config import StorageSettings, load_settings
from kensho.errors import DownloadError, SourceError
from kensho.runtime.clock import VirtualClock
from kensho.storage.sources import (
    DEFAULT_MIN_RATE,
    HttpSource,
    SourceUnreachableError,
    source_from_string,
)
from kensho.storage.sources._health import RateGuard, TransferTooSlowError

DATA = bytes(range(256)) * 16  # 4 KiB


class Collect:
    def __init__(self) -> None:
        self.buf = bytearray()

    async def __call__(self, data: bytes) -> None:
        self.buf += data


def source(
    handler: Callable[[httpx.Request], httpx.Response], clock: VirtualClock, **kw: float
) -> HttpSource:
    opts: dict[str, float] = {"wait_initial": 0.0, "wait_max": 0.0, "wait_jitter": 0.0}
    opts.update(kw)
    return HttpSource(
        "http://mirror.test/",
        transport=httpx.MockTransport(handler),
        clock=clock,
        **opts,  # type: ignore[arg-type]
    )


def ranged(start: int, body: httpx.AsyncByteStream) -> httpx.Response:
    headers = {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"}
    return httpx.Response(206, headers=headers, stream=body)


def body(data: bytes) -> httpx.Response:
    """A 200 whose body is streamed, as from a real server (``content=`` is pre-read)."""
    return httpx.Response(200, stream=httpx.ByteStream(data))


def start_of(request: httpx.Request) -> int:
    return int(request.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0])


class Trickle(httpx.AsyncByteStream):
    """One byte per ``interval`` virtual seconds, from ``start``; optionally then a failure."""

    def __init__(
        self, clock: VirtualClock, start: int, interval: float, *, then: Exception | None = None
    ) -> None:
        self.clock, self.start, self.interval, self.then = clock, start, interval, then

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(self.start, len(DATA)):
            await self.clock.advance(self.interval)
            yield DATA[i : i + 1]
            if self.then is not None:
                await self.clock.advance(self.interval)
                raise self.then


# -- the guard itself ------------------------------------------------------------------


def test_guard_passes_a_fast_window_and_refuses_a_slow_one() -> None:
    clock = VirtualClock()
    guard = RateGuard(100, 10, clock)
    guard.start()
    clock._now = 10.0  # time only moves in these sync tests, nothing is scheduled
    guard.feed(1000)  # 100 bytes/s over the first 10 s: just enough
    clock._now = 20.0
    with pytest.raises(TransferTooSlowError, match=r"sent 999 bytes in 10\.0 s"):
        guard.feed(999)  # the next window is judged on its own: no credit carried over


def test_guard_does_not_count_paused_time_or_judge_an_unfinished_window() -> None:
    clock = VirtualClock()
    guard = RateGuard(100, 10, clock)
    guard.start()
    clock._now = 9.0
    guard.feed(1)  # 9 s is not a whole window yet
    with guard.paused():
        clock._now = 1000.0  # the sink took ages: our time, not the source's
    guard.feed(1)
    guard.stop()
    clock._now = 5000.0  # stopped: waiting between retries does not count either
    guard.check()
    guard.start()
    clock._now = 5001.0
    with pytest.raises(TransferTooSlowError, match=r"sent 2 bytes in 10\.0 s"):
        guard.check()


def test_guard_with_no_minimum_never_refuses() -> None:
    clock = VirtualClock()
    guard = RateGuard(0, 1, clock)
    guard.start()
    clock._now = 1e9
    guard.feed(1)


# -- slow retrieval --------------------------------------------------------------------


async def test_a_trickling_server_is_abandoned_after_one_window() -> None:
    clock = VirtualClock()
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return ranged(start_of(request), Trickle(clock, start_of(request), 1.0))

    src = source(handler, clock, min_rate=100, rate_window=30)
    sink = Collect()
    with pytest.raises(DownloadError, match="below the minimum of 100 bytes/s") as info:
        await src.fetch("w.bin", 0, len(DATA), len(DATA), sink)
    assert "abandoned for the rest of this run" in str(info.value)
    assert 30 <= clock.monotonic() <= 31  # one window, not the 4096 s the bytes would take
    assert len(sink.buf) <= 31
    assert src.abandoned is not None and "below the minimum" in src.abandoned

    with pytest.raises(DownloadError, match=r"skipped, not asked again: .*below the minimum"):
        await src.fetch("other.bin", 0, 10, 10, Collect())
    assert len(requests) == 1
    await src.aclose()


async def test_a_byte_then_a_stall_past_the_read_timeout_is_too_slow_not_retried() -> None:
    """Each read would time out after one byte; retrying would resume forever."""
    clock = VirtualClock()
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        stall = httpx.ReadTimeout("timed out", request=request)
        return ranged(start_of(request), Trickle(clock, start_of(request), 31.0, then=stall))

    src = source(handler, clock, attempts=100, min_rate=100, rate_window=30)
    with pytest.raises(DownloadError, match="below the minimum"):
        await src.fetch("w.bin", 0, len(DATA), len(DATA), Collect())
    assert len(requests) == 1
    await src.aclose()


async def test_one_byte_per_retry_does_not_renew_the_retry_budget() -> None:
    """A server that sends one byte and hangs up, every time, got a fresh budget per
    byte before; now only a source that delivers at the minimum rate gets one."""
    clock = VirtualClock()
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        drop = httpx.ReadError("connection reset by peer", request=request)
        return ranged(start_of(request), Trickle(clock, start_of(request), 0.5, then=drop))

    src = source(handler, clock, attempts=3, min_rate=100, rate_window=30)
    with pytest.raises(DownloadError, match="connection reset"):
        await src.fetch("w.bin", 0, len(DATA), len(DATA), Collect())
    assert len(requests) == 3  # one budget, not one per byte
    assert src.abandoned is not None
    await src.aclose()


async def test_a_fast_transfer_is_never_judged_slow() -> None:
    clock = VirtualClock()

    def handler(request: httpx.Request) -> httpx.Response:
        return body(DATA)

    src = source(handler, clock, min_rate=DEFAULT_MIN_RATE, rate_window=0.001)
    sink = Collect()
    await src.fetch("w.bin", 0, len(DATA), len(DATA), sink)
    assert bytes(sink.buf) == DATA and src.abandoned is None
    await src.aclose()


# -- leave me alone --------------------------------------------------------------------


async def test_a_long_retry_after_abandons_at_once_until_it_has_passed() -> None:
    clock = VirtualClock()
    requests: list[httpx.Request] = []
    down = [True]

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if down[0]:
            return httpx.Response(503, headers={"Retry-After": "99999"})
        return body(DATA)

    src = source(handler, clock, attempts=6)
    with pytest.raises(SourceError, match="left alone for 99999 s") as info:
        await src.fetch("a.bin", 0, len(DATA), len(DATA), Collect())
    assert type(info.value) is SourceError
    assert clock.monotonic() == 0  # no wait at all: the run would not wait that long
    for name in ("b.bin", "c.bin", "d.bin"):
        with pytest.raises(SourceError, match="skipped, not asked again"):
            await src.fetch(name, 0, len(DATA), len(DATA), Collect())
    assert len(requests) == 1

    down[0] = False
    await clock.advance(99999)  # the server said when it would be back: ask it then
    sink = Collect()
    await src.fetch("a.bin", 0, len(DATA), len(DATA), sink)
    assert bytes(sink.buf) == DATA and src.abandoned is None
    assert len(requests) == 2
    await src.aclose()


async def test_a_short_retry_after_is_waited_for_and_retried() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"})
        return body(DATA)

    src = source(handler, VirtualClock())
    sink = Collect()
    await src.fetch("a.bin", 0, len(DATA), len(DATA), sink)
    assert bytes(sink.buf) == DATA and len(requests) == 2 and src.abandoned is None
    await src.aclose()


async def test_concurrent_files_ask_a_server_that_wants_to_be_left_alone_once() -> None:
    """Files repaired at the same time wait for the first answer instead of each
    paying for it: the 503 abandons the source before the others ask."""
    requests: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        await asyncio.sleep(0)  # let the other fetches run up to their own request
        return httpx.Response(429, headers={"Retry-After": "3600"})

    src = HttpSource("http://mirror.test/", transport=httpx.MockTransport(handler))
    results = await asyncio.gather(
        *(src.fetch(f"f{i}.bin", 0, 10, 10, Collect()) for i in range(4)),
        return_exceptions=True,
    )
    assert all(isinstance(r, SourceError) for r in results)
    assert len(requests) == 1
    assert sum("skipped" in str(r) for r in results) == 3
    await src.aclose()


async def test_once_a_server_answered_files_are_fetched_in_parallel() -> None:
    in_flight, most = [0], [0]
    release = asyncio.Event()

    class Held(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            if most[0] >= 3:
                release.set()
            await release.wait()
            in_flight[0] -= 1
            yield DATA

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Held())

    src = HttpSource("http://mirror.test/", transport=httpx.MockTransport(handler))
    await asyncio.wait_for(
        asyncio.gather(*(src.fetch(f"f{i}", 0, len(DATA), len(DATA), Collect()) for i in range(3))),
        timeout=10,
    )
    assert most[0] == 3
    await src.aclose()


async def test_a_cancelled_probe_lets_the_next_request_probe() -> None:
    entered = asyncio.Event()
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/first":
            entered.set()
            await asyncio.Event().wait()  # never answers; the test cancels it
        return body(b"x")

    src = HttpSource("http://mirror.test/", transport=httpx.MockTransport(handler))
    first = asyncio.create_task(src.fetch("first", 0, 1, 1, Collect()))
    await entered.wait()
    second = asyncio.create_task(src.fetch("second", 0, 1, 1, Collect()))
    await VirtualClock().settle()  # run every ready task: the second is blocked, not slow
    assert calls == ["/first"]  # the second waits for the first answer
    first.cancel()
    await asyncio.wait_for(second, timeout=10)
    assert calls == ["/first", "/second"]
    await src.aclose()


# -- what abandons and what does not ---------------------------------------------------


async def test_an_unreachable_source_stays_unreachable_when_skipped() -> None:
    """Offline boot depends on "no source could be reached": the skip keeps the class."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    src = source(handler, VirtualClock(), attempts=2)
    with pytest.raises(SourceUnreachableError, match="cannot connect"):
        await src.fetch("a.bin", 0, 1, 1, Collect())
    with pytest.raises(SourceUnreachableError, match="skipped, not asked again"):
        await src.fetch("b.bin", 0, 1, 1, Collect())
    assert len(requests) == 2  # the first fetch's two attempts, nothing for the second
    await src.aclose()


async def test_a_timeout_abandons_the_source() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        raise httpx.ReadTimeout("timed out", request=request)

    src = source(handler, VirtualClock(), attempts=1)
    with pytest.raises(DownloadError, match="stopped sending data"):
        await src.fetch("a.bin", 0, 1, 1, Collect())
    with pytest.raises(DownloadError, match=r"skipped.*stopped sending data"):
        await src.fetch("b.bin", 0, 1, 1, Collect())
    assert len(requests) == 1
    await src.aclose()


async def test_problems_of_one_file_do_not_abandon_the_source() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/missing.bin":
            return httpx.Response(404)
        if request.url.path == "/short.bin":
            return httpx.Response(
                200, headers={"Content-Length": "4"}, stream=httpx.ByteStream(b"abcd")
            )
        return body(DATA)

    src = source(handler, VirtualClock())
    with pytest.raises(SourceError, match="404"):
        await src.fetch("missing.bin", 0, 10, 10, Collect())
    with pytest.raises(DownloadError, match="manifest declares 10"):
        await src.fetch("short.bin", 0, 10, 10, Collect())
    assert src.abandoned is None
    sink = Collect()
    await src.fetch("w.bin", 0, len(DATA), len(DATA), sink)
    assert bytes(sink.buf) == DATA
    await src.aclose()


async def test_sink_errors_do_not_abandon_the_source() -> None:
    async def full_disk(_: bytes) -> None:
        raise OSError(28, "No space left on device")

    src = source(lambda request: body(DATA), VirtualClock())
    with pytest.raises(OSError, match="No space"):
        await src.fetch("w.bin", 0, len(DATA), len(DATA), full_disk)
    assert src.abandoned is None
    await src.aclose()


# -- settings --------------------------------------------------------------------------


async def test_storage_settings_reach_the_http_source(tmp_path: Path) -> None:
    env = {
        "KENSHO_STORAGE_SOURCE_TIMEOUT": "0.5",
        "KENSHO_STORAGE_SOURCE_RETRIES": "0",
        "KENSHO_STORAGE_SOURCE_MIN_RATE": "1000",
        "KENSHO_STORAGE_SOURCE_RATE_WINDOW": "2",
    }
    settings = load_settings(env=env, cwd=tmp_path).storage
    src = source_from_string("http://mirror.test/", settings=settings)
    assert isinstance(src, HttpSource)
    assert (src.attempts, src.min_rate, src.rate_window) == (1, 1000.0, 2.0)
    timeout = src._client.timeout
    assert (timeout.read, timeout.connect) == (0.5, 0.5)
    await src.aclose()

    default = source_from_string("http://mirror.test/", settings=StorageSettings(), attempts=2)
    assert isinstance(default, HttpSource)
    assert default.attempts == 2  # an explicit option wins over the settings
    assert default.min_rate == DEFAULT_MIN_RATE and default._client.timeout.connect == 10.0
    await default.aclose()


def test_a_negative_minimum_rate_is_a_clear_config_error(tmp_path: Path) -> None:
    from kensho.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"KENSHO_STORAGE_SOURCE_MIN_RATE: storage\.source_min_rate"
    ):
        load_settings(env={"KENSHO_STORAGE_SOURCE_MIN_RATE": "-1"}, cwd=tmp_path)
