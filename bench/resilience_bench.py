"""Resilience benchmark: Kensho's breaker and executor against the Python breakers.

Run: ``.venv/bin/python bench/resilience_bench.py`` (``--quick`` for a smoke run).

Tables (markdown, medians over repeated rounds, interleaved so drift hits everyone):

1. Per-call overhead on a trivial call, async (Kensho, aiobreaker, purgatory,
   circuitbreaker) and sync (Kensho permit API, pybreaker, circuitbreaker). pybreaker's
   async support needs Tornado, so it is measured on sync calls only. Overhead = time
   per call through the breaker minus a bare call. Target: Kensho's async overhead at
   most half of the fastest async peer's.
2. Cost of a rejected call while the breaker is open (raise + catch included).
3. Concurrent calls admitted in half-open (10 callers arrive together).
4. Executor overhead per task: submit -> first chunk on a zero-latency engine
   (target < 50 us), next to the same path without the executor.
5. Overload at 10x capacity with mixed priorities (real time): CRITICAL latency vs an
   unloaded run, and tasks lost (must be 0).
6. Failover (real time): the GPU dies at t0 and recovers later: user-visible errors,
   time to OPEN, time to CLOSED after recovery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import aiobreaker
import circuitbreaker
import purgatory
import pybreaker

from kensho.errors import CircuitOpenError, QueueFullError
from kensho.events import BreakerStateChanged, Event
from kensho.runtime import (
    AsyncioClock,
    CircuitBreaker,
    FaultyEngine,
    GenerationRequest,
    MockCPUEngine,
    MockGPUEngine,
    Priority,
    RuntimeManager,
    TaskExecutor,
    TaskHandle,
)
from kensho.telemetry import configure_logging

PEERS = ("pybreaker", "aiobreaker", "purgatory", "circuitbreaker")


class Boom(Exception):
    pass


async def trivial() -> int:
    return 1


def trivial_sync() -> int:
    return 1


async def failing() -> int:
    raise Boom("down")


def failing_sync() -> int:
    raise Boom("down")


def fmt_ns(seconds: float) -> str:
    return f"{seconds * 1e9:,.0f} ns"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- 1 & 2: per-call overhead and rejection cost -------------------------------------------

AsyncLoop = Callable[[int], Awaitable[None]]
SyncLoop = Callable[[int], None]


async def make_async_loops() -> dict[str, AsyncLoop]:
    kensho = CircuitBreaker("bench", failure_threshold=5, open_duration=60)
    ab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=60))
    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    await factory.initialize()
    purg = factory("bench")(trivial)
    cb = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)(trivial)

    async def bare(n: int) -> None:
        for _ in range(n):
            await trivial()

    async def kensho_loop(n: int) -> None:
        call = kensho.call
        for _ in range(n):
            await call(trivial)

    async def aiobreaker_loop(n: int) -> None:
        call = ab.call_async
        for _ in range(n):
            await call(trivial)

    async def purgatory_loop(n: int) -> None:
        for _ in range(n):
            await purg()

    async def circuitbreaker_loop(n: int) -> None:
        for _ in range(n):
            await cb()

    return {
        "bare await": bare,
        "kensho": kensho_loop,
        "aiobreaker": aiobreaker_loop,
        "purgatory": purgatory_loop,
        "circuitbreaker": circuitbreaker_loop,
    }


def make_sync_loops() -> dict[str, SyncLoop]:
    kensho = CircuitBreaker("bench-sync", failure_threshold=5, open_duration=60)
    pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    cb = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)(trivial_sync)

    def bare(n: int) -> None:
        for _ in range(n):
            trivial_sync()

    def kensho_loop(n: int) -> None:
        acquire = kensho.acquire
        for _ in range(n):
            permit = acquire()
            trivial_sync()
            permit.success()

    def pybreaker_loop(n: int) -> None:
        call = pb.call
        for _ in range(n):
            call(trivial_sync)

    def circuitbreaker_loop(n: int) -> None:
        for _ in range(n):
            cb()

    return {
        "bare call": bare,
        "kensho (permit)": kensho_loop,
        "pybreaker": pybreaker_loop,
        "circuitbreaker": circuitbreaker_loop,
    }


async def time_async(loops: dict[str, AsyncLoop], n: int, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for loop in loops.values():  # warm-up
        await loop(n // 10)
    for _ in range(rounds):
        for name, loop in loops.items():
            gc.disable()
            start = time.perf_counter()
            await loop(n)
            samples[name].append((time.perf_counter() - start) / n)
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def time_sync(loops: dict[str, SyncLoop], n: int, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for loop in loops.values():
        loop(n // 10)
    for _ in range(rounds):
        for name, loop in loops.items():
            gc.disable()
            start = time.perf_counter()
            loop(n)
            samples[name].append((time.perf_counter() - start) / n)
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


async def overhead_tables(n: int, rounds: int) -> str:
    async_times = await time_async(await make_async_loops(), n, rounds)
    sync_times = time_sync(make_sync_loops(), n, rounds)
    bare_a = async_times.pop("bare await")
    bare_s = sync_times.pop("bare call")
    over_a = {k: v - bare_a for k, v in async_times.items()}
    over_s = {k: v - bare_s for k, v in sync_times.items()}
    ours_a = over_a["kensho"]
    fastest_peer = min(v for k, v in over_a.items() if k != "kensho")
    rows = [["bare `await`", fmt_ns(bare_a), "—", "—"]]
    for name, total in sorted(async_times.items(), key=lambda kv: kv[1]):
        ratio = over_a[name] / ours_a if ours_a > 0 else float("inf")
        rows.append([name, fmt_ns(total), fmt_ns(over_a[name]), f"{ratio:.1f}x"])
    out = [
        f"### Per-call overhead, async (median of {rounds} rounds x {n:,} calls)",
        "",
        table(["breaker", "time per call", "overhead", "overhead vs kensho"], rows),
        "",
        f"Kensho's async overhead is {ours_a / fastest_peer:.0%} of the fastest async "
        f"peer's (target: at most 50%): "
        + ("**met**" if ours_a <= fastest_peer / 2 else "**not met**"),
        "",
    ]
    rows = [["bare call", fmt_ns(bare_s), "—", "—"]]
    ours_s = over_s["kensho (permit)"]
    for name, total in sorted(sync_times.items(), key=lambda kv: kv[1]):
        ratio = over_s[name] / ours_s if ours_s > 0 else float("inf")
        rows.append([name, fmt_ns(total), fmt_ns(over_s[name]), f"{ratio:.1f}x"])
    out += [
        f"### Per-call overhead, sync (median of {rounds} rounds x {n:,} calls)",
        "",
        table(["breaker", "time per call", "overhead", "overhead vs kensho"], rows),
        "",
    ]
    return "\n".join(out)


async def rejection_table(n: int, rounds: int) -> str:
    kensho = CircuitBreaker("rej", failure_threshold=1, open_duration=3600)
    kensho.trip("bench")
    ab = aiobreaker.CircuitBreaker(fail_max=1, timeout_duration=timedelta(hours=1))
    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=3600)
    await factory.initialize()
    purg = factory("rej")(failing)
    cb = circuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=3600)(failing)
    pb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600)
    for attempt in (lambda: ab.call_async(failing), purg, cb):
        with contextlib.suppress(Exception):  # trips the breaker
            await attempt()
    with contextlib.suppress(Exception):
        pb.call(failing_sync)

    async def kensho_loop(k: int) -> None:
        for _ in range(k):
            try:  # noqa: SIM105 - cheaper than suppress() in a timed loop
                await kensho.call(trivial)
            except CircuitOpenError:
                pass

    async def ab_loop(k: int) -> None:
        for _ in range(k):
            try:  # noqa: SIM105 - cheaper than suppress() in a timed loop
                await ab.call_async(trivial)
            except aiobreaker.CircuitBreakerError:
                pass

    async def purg_loop(k: int) -> None:
        for _ in range(k):
            try:  # noqa: SIM105 - cheaper than suppress() in a timed loop
                await purg()
            except Exception:  # purgatory raises its OpenedState
                pass

    async def cb_loop(k: int) -> None:
        for _ in range(k):
            try:  # noqa: SIM105 - cheaper than suppress() in a timed loop
                await cb()
            except circuitbreaker.CircuitBreakerError:
                pass

    def pb_loop(k: int) -> None:
        for _ in range(k):
            try:  # noqa: SIM105 - cheaper than suppress() in a timed loop
                pb.call(trivial_sync)
            except pybreaker.CircuitBreakerError:
                pass

    times = await time_async(
        {
            "kensho": kensho_loop,
            "aiobreaker": ab_loop,
            "purgatory": purg_loop,
            "circuitbreaker": cb_loop,
        },
        n,
        rounds,
    )
    times["pybreaker (sync)"] = time_sync({"pybreaker (sync)": pb_loop}, n, rounds)[
        "pybreaker (sync)"
    ]
    ours = times["kensho"]
    rows = [
        [name, fmt_ns(t), f"{t / ours:.1f}x"]
        for name, t in sorted(times.items(), key=lambda kv: kv[1])
    ]
    return "\n".join(
        [
            f"### Rejected call while open (median of {rounds} rounds x {n:,} calls)",
            "",
            table(["breaker", "time per rejected call", "vs kensho"], rows),
            "",
        ]
    )


# -- 3: half-open admission ----------------------------------------------------------------


async def half_open_table() -> str:
    callers = 10
    results: dict[str, int] = {}

    async def storm(call: Callable[[Callable[[], Awaitable[int]]], Awaitable[Any]]) -> int:
        entered = 0
        gate = asyncio.Event()

        async def probe() -> int:
            nonlocal entered
            entered += 1
            await gate.wait()
            return 1

        tasks = [asyncio.ensure_future(call(probe)) for _ in range(callers)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return entered

    kensho = CircuitBreaker("ho", failure_threshold=1, open_duration=0.3, half_open_max_calls=1)
    kensho.trip("bench")
    ab = aiobreaker.CircuitBreaker(fail_max=1, timeout_duration=timedelta(seconds=0.3))
    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=0.3)
    await factory.initialize()
    cb = circuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=0.3)
    with_cb_fail = cb(failing)
    for attempt in (lambda: ab.call_async(failing), factory("ho")(failing), with_cb_fail):
        with contextlib.suppress(Exception):  # trips the breaker
            await attempt()
    await asyncio.sleep(0.4)
    results["kensho (half_open_max_calls=1)"] = await storm(kensho.call)
    results["aiobreaker"] = await storm(ab.call_async)
    results["purgatory"] = await storm(lambda f: factory("ho")(f)())
    results["circuitbreaker"] = await storm(lambda f: cb(f)())
    rows = [[name, f"{n} of {callers}"] for name, n in results.items()]
    return "\n".join(
        [
            "### Calls admitted in half-open (10 concurrent callers arrive together)",
            "",
            table(["breaker", "admitted"], rows),
            "",
        ]
    )


# -- 4: executor overhead -------------------------------------------------------------------


async def executor_table(n: int) -> str:
    engine = FaultyEngine("zero", "gpu")  # zero latency
    await engine.load()
    runtime = RuntimeManager(engine, first_token_timeout=None, chunk_timeout=None)
    runtime_t = RuntimeManager(FaultyEngine("zero-t", "gpu"))  # with hang-detection timers
    await runtime.start()
    await runtime_t.start()
    executor = TaskExecutor(runtime, concurrency={"gpu": 1}, max_queue_size=n + 10)
    executor_t = TaskExecutor(runtime_t, concurrency={"gpu": 1}, max_queue_size=n + 10)
    request = GenerationRequest(prompt="x", max_tokens=1)

    async def bare_engine() -> float:
        start = time.perf_counter()
        stream = engine.generate(request)
        await anext(stream)
        elapsed = time.perf_counter() - start
        await stream.aclose()
        return elapsed

    async def via_runtime() -> float:
        start = time.perf_counter()
        stream = runtime.generate(request)
        await anext(stream)
        elapsed = time.perf_counter() - start
        await stream.aclose()  # type: ignore[attr-defined]
        return elapsed

    def via_executor(ex: TaskExecutor) -> Callable[[], Awaitable[float]]:
        async def run() -> float:
            start = time.perf_counter()
            handle = ex.submit(request)
            await anext(handle)
            elapsed = time.perf_counter() - start
            await handle.wait()
            return elapsed

        return run

    paths: dict[str, Callable[[], Awaitable[float]]] = {
        "engine alone": bare_engine,
        "runtime manager (breaker, no timers)": via_runtime,
        "executor + runtime (no timers)": via_executor(executor),
        "executor + runtime (default: queue deadline, hang timers)": via_executor(executor_t),
    }
    samples: dict[str, list[float]] = {k: [] for k in paths}
    for path in paths.values():
        for _ in range(200):
            await path()
    gc.disable()
    for _ in range(n):
        for name, path in paths.items():
            samples[name].append(await path())
    gc.enable()
    await executor.aclose()
    await executor_t.aclose()
    rows = [
        [name, fmt_us(statistics.median(v)), fmt_us(pct(v, 0.99))] for name, v in samples.items()
    ]
    total = statistics.median(samples["executor + runtime (default: queue deadline, hang timers)"])
    return "\n".join(
        [
            f"### Submit -> first chunk, zero-latency engine ({n:,} tasks, one at a time)",
            "",
            table(["path", "median", "p99"], rows),
            "",
            f"Executor path with default settings: {fmt_us(total)} median (target < 50 µs): "
            + ("**met**" if total < 50e-6 else "**not met**"),
            "",
        ]
    )


# -- 5: overload ------------------------------------------------------------------------------


async def overload_table(duration: float) -> str:
    gpu = MockGPUEngine(time_to_first_token=0.004, time_per_token=0.001)
    runtime = RuntimeManager(gpu)
    await runtime.start()
    tokens = 4
    service = 0.004 + 0.001 * (tokens - 1)
    concurrency = 4
    capacity = concurrency / service  # tasks per second
    request = GenerationRequest(prompt="x", max_tokens=tokens)

    async def unloaded() -> list[float]:
        executor = TaskExecutor(runtime, concurrency={"gpu": concurrency})
        latencies = []
        for _ in range(100):
            handle = executor.submit(request, priority=Priority.CRITICAL)
            await handle.wait()
            assert handle.finished_at is not None
            latencies.append(handle.finished_at - handle.submitted_at)
        await executor.aclose()
        return latencies

    base = await unloaded()
    executor = TaskExecutor(
        runtime,
        concurrency={"gpu": concurrency},
        max_queue_size=64,
        max_queue_wait=2.0,
        rejection_threshold=50,
        rejection_window=1.0,
        hard_open_duration=0.5,
    )
    # CRITICAL is 5 % of the offered load, i.e. half of the capacity: served, not drowned.
    mix = [Priority.CRITICAL] + [Priority.HIGH] * 3 + [Priority.NORMAL] * 8 + [Priority.LOW] * 8
    rate = 10 * capacity
    tick = 0.005
    per_tick = rate * tick
    handles: list[TaskHandle] = []
    refused = {"rejected": 0, "overloaded": 0}
    offered = 0
    debt = 0.0
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    while loop.time() < end:
        debt += per_tick
        while debt >= 1:
            debt -= 1
            priority = mix[offered % len(mix)]
            offered += 1
            try:
                handles.append(executor.submit(request, priority=priority))
            except QueueFullError as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
        await asyncio.sleep(tick)
    await executor.join()
    stats = executor.statistics()
    ended = stats.completed + stats.failed + stats.cancelled + stats.timed_out + stats.shed
    lost = stats.accepted - ended
    unanswered = offered - len(handles) - sum(refused.values())
    crit = [
        h.finished_at - h.submitted_at
        for h in handles
        if h.priority is Priority.CRITICAL
        and h.finished_at is not None
        and h.outcome == "completed"
    ]
    crit_total = sum(1 for h in handles if h.priority is Priority.CRITICAL)
    await executor.aclose()
    rows = [
        ["offered (10x capacity)", f"{offered:,} in {duration:g} s ({rate:,.0f}/s)"],
        ["accepted", f"{stats.accepted:,}"],
        ["completed", f"{stats.completed:,}"],
        ["shed (lower priority, for a higher one)", f"{stats.shed:,}"],
        ["rejected: queue full", f"{refused.get('rejected', 0):,}"],
        ["rejected: hard open (non-critical)", f"{refused.get('overloaded', 0):,}"],
        ["timed out in queue", f"{stats.timed_out:,}"],
        ["CRITICAL completed", f"{len(crit)} of {crit_total} submitted"],
        ["**tasks lost** (accepted, never ended)", f"**{lost}**"],
        ["submissions with no answer", f"**{unanswered}**"],
        [
            "CRITICAL latency p50 / p99, unloaded",
            f"{fmt_ms(pct(base, 0.5))} / {fmt_ms(pct(base, 0.99))}",
        ],
        [
            "CRITICAL latency p50 / p99, at 10x load",
            f"{fmt_ms(pct(crit, 0.5))} / {fmt_ms(pct(crit, 0.99))}"
            + f" ({pct(crit, 0.99) / pct(base, 0.99):.1f}x unloaded p99)",
        ],
    ]
    return "\n".join(
        [
            f"### Overload at 10x capacity (GPU mock: {concurrency} slots x "
            f"{fmt_ms(service)} per task = {capacity:,.0f} tasks/s; priorities "
            "5% CRITICAL, 15% HIGH, 40% NORMAL, 40% LOW)",
            "",
            table(["measure", "value"], rows),
            "",
        ]
    )


# -- 6: failover ------------------------------------------------------------------------------


async def failover_table(mid_stream: bool) -> str:
    gpu = MockGPUEngine(time_to_first_token=0.004, time_per_token=0.001)
    cpu = MockCPUEngine(time_to_first_token=0.020, time_per_token=0.005)
    open_duration = 0.5
    clock = AsyncioClock()
    breaker = CircuitBreaker(
        "gpu", clock=clock, failure_threshold=3, success_threshold=2, open_duration=open_duration
    )
    runtime = RuntimeManager(gpu, cpu, clock=clock, primary_breaker=breaker)
    await runtime.start()
    executor = TaskExecutor(runtime, concurrency={"gpu": 8, "cpu": 4}, max_queue_size=500)
    loop = asyncio.get_running_loop()
    marks: dict[str, float] = {}

    transitions: list[str] = []

    def on_event(event: Event) -> None:
        if isinstance(event, BreakerStateChanged) and event.breaker == "gpu":
            marks.setdefault(event.to_state, loop.time())
            transitions.append(event.to_state)

    runtime.add_listener(on_event)
    request = GenerationRequest(prompt="x", max_tokens=6)
    errors: list[str] = []
    engines: dict[str, int] = {}
    done = 0

    async def user() -> None:
        nonlocal done
        try:
            handle = executor.submit(request, priority=Priority.NORMAL)
            async for chunk in handle:
                engines[chunk.engine] = engines.get(chunk.engine, 0) + 1
            done += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    users: list[asyncio.Task[None]] = []

    async def traffic(seconds: float) -> None:
        stop = loop.time() + seconds
        while loop.time() < stop:
            users.append(asyncio.ensure_future(user()))
            await asyncio.sleep(0.005)

    await traffic(0.3)
    t0 = loop.time()
    if mid_stream:
        gpu.force_failure(after_tokens=3)
    else:
        gpu.force_failure()
    await traffic(1.0)
    t1 = loop.time()
    gpu.heal()
    await traffic(open_duration + 0.7)
    await asyncio.gather(*users)
    await executor.aclose()
    to_open = marks.get("open", float("nan")) - t0
    to_closed = marks.get("closed", float("nan")) - t1
    m = runtime.metrics()
    rows = [
        ["requests", f"{len(users):,}"],
        ["**user-visible errors**", f"**{len(errors)}**"],
        ["rerouted to CPU after a GPU failure", f"{m.rerouted}"],
        ["of which continued mid-stream", f"{m.continued_mid_stream}"],
        ["served by CPU while GPU open", f"{m.served_by_fallback}"],
        ["time to OPEN after GPU dies", fmt_ms(to_open)],
        [
            "time to CLOSED after GPU recovers",
            f"{fmt_ms(to_closed)} (at most open_duration {open_duration:g} s + 2 probes: "
            "the next test after recovery)",
        ],
        ["breaker transitions", " -> ".join(["closed", *transitions])],
    ]
    if errors:
        rows.append(["first error", errors[0][:120]])
    title = "mid-stream (after 3 tokens)" if mid_stream else "before the first token"
    return "\n".join(
        [
            f"### Failover: GPU dies {title} at t0, recovers 1 s later "
            "(GPU mock 4+1 ms/token, CPU 5x slower, 200 requests/s)",
            "",
            table(["measure", "value"], rows),
            "",
        ]
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    args = parser.parse_args()
    configure_logging(level="critical", stderr=False)
    n, rounds, tasks, overload_s = (2_000, 3, 300, 0.5) if args.quick else (20_000, 15, 3_000, 2.0)
    started = time.perf_counter()
    sections = [
        "## Kensho resilience benchmark",
        "",
        f"Python {sys.version.split()[0]} on {sys.platform}, {os.cpu_count()} CPUs; "
        + ", ".join(f"{name} {version(name)}" for name in PEERS)
        + ".",
        "",
        await overhead_tables(n, rounds),
        await rejection_table(n, rounds),
        await half_open_table(),
        await executor_table(tasks),
        await overload_table(overload_s),
        await failover_table(mid_stream=False),
        await failover_table(mid_stream=True),
        f"_Total bench time: {time.perf_counter() - started:.0f} s._",
    ]
    print("\n".join(sections))


if __name__ == "__main__":
    asyncio.run(main())
