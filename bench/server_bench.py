"""The HTTP API against the same runtime in process: TTFT, tokens/s and requests/s.

Three measurements, one run:

1. **Latency, zero-latency fault-injecting engine** (``KENSHO_MODEL_ENGINE=mock``, no
   sleep before or between tokens), so what is left is overhead. One streamed chat
   completion at a time, of 1 token (pure overhead) and of ``--tokens`` tokens, rounds
   interleaved across the paths so drift hits all of them:

   - in process, ``RuntimeManager.generate()`` (breaker only) and
     ``TaskExecutor.submit()`` (breaker + priority queue: the path the server uses, and
     the baseline of the deltas);
   - through ``kensho up`` on 127.0.0.1: raw SSE read with ``httpx``, and the official
     ``openai`` client, sync (``OpenAI``) and async (``AsyncOpenAI``), ``stream=True``;
   - the ``openai`` client alone, replaying the server's recorded bytes from memory (no
     server, no socket): the client's own share of the HTTP cost.

   Time to first token (TTFT) runs from the call to the first token's chunk (the
   role-only opening chunk of a chat stream is not a token); tokens/s is tokens over the
   whole request, TTFT included. Target: HTTP (openai client) adds under 2 ms to TTFT.
2. **Latency, embedded demo model** (``kensho-demo``; TorchEngine on the CPU, greedy,
   fixed prompt, ``--threads`` torch threads in both processes): the same paths, where
   the engine's own time dominates.
3. **Throughput**: ``--concurrency`` clients (``httpx.AsyncClient``, keep-alive) send chat
   completions of 16 tokens back to back to the zero-latency mock for ``--duration``
   seconds after a warm-up, non-streaming and streaming, with the executor's default
   limits and with them raised to the concurrency; requests/s, p50/p99 latency, and the
   CPU used by the server process and by the client process (on 2 vCPUs the client
   competes with the server, so requests/s is a floor for the server alone).

The in-process kernel and the server are booted with the same settings, each on its own
fresh store in a temporary folder, and are alive at the same time; servers bind
127.0.0.1 on a free port and are always stopped (SIGTERM, then kill). About 1.5 minutes
on a 2-vCPU machine; other load on the machine shows in the numbers (the load average
is printed first).

    .venv/bin/python bench/server_bench.py [--mock-rounds 300] [--demo-rounds 21]
        [--tokens 64] [--concurrency 16] [--duration 5] [--threads 1] [--skip-demo]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
import openai
import orjson
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _table import machine_line, markdown_table
from kensho.config import load_settings
from kensho.kernel import Kernel
from kensho.runtime.engines.base import GenerationRequest
from kensho.telemetry import configure_logging

PROMPT = "Tell me about the GPU."
BOOT_TIMEOUT = 120.0
LOAD_TOKENS = 16  # max_tokens of each request in the throughput run
MOCK_ENV = {
    "KENSHO_MODEL_ENGINE": "mock",
    "KENSHO_MODEL_ID": "mock",
    "KENSHO_MODEL_MOCK_TIME_TO_FIRST_TOKEN": "0",
    "KENSHO_MODEL_MOCK_TIME_PER_TOKEN": "0",
}


# -- one sample per request ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    ttft: float
    tokens: int
    total: float


def _sample(start: float, first: float, tokens: int) -> Sample:
    return Sample(ttft=first - start, tokens=tokens, total=time.perf_counter() - start)


def _pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- the server as a subprocess -------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str = ""
    stderr: list[str] = field(default_factory=list)


def _pump(stream: object, sink: list[str] | None, lines: queue.Queue[str | None] | None) -> None:
    for line in stream:  # type: ignore[attr-defined]
        if sink is not None:
            sink.append(line)
        if lines is not None:
            lines.put(line)
    if lines is not None:
        lines.put(None)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def kensho_up(data_home: Path, extra: dict[str, str]) -> Iterator[Server]:
    """Run ``kensho up`` on a free loopback port; yield once it listens; always stop it."""
    data_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KENSHO_")}
    env.update(
        {
            "XDG_DATA_HOME": str(data_home),
            "KENSHO_SERVER_HOST": "127.0.0.1",
            "KENSHO_SERVER_PORT": "0",
            "KENSHO_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "kensho", "up"],
        env=env,
        cwd=data_home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Server(process)
    out_lines: queue.Queue[str | None] = queue.Queue()
    threads = [
        threading.Thread(target=_pump, args=(process.stdout, None, out_lines), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, server.stderr, None), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not server.url:
            try:
                line = out_lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    "kensho up did not start in time:\n" + "".join(server.stderr)
                ) from None
            if line is None:
                process.wait(timeout=30)
                raise RuntimeError(
                    f"kensho up exited with {process.returncode}:\n" + "".join(server.stderr)
                )
            if line.startswith("kensho: listening on "):
                server.url = line.split()[-1]
        yield server
    finally:
        _stop(process)
        for thread in threads:
            thread.join(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux ``/proc``), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the same runtime in process --------------------------------------------------------------


@contextlib.asynccontextmanager
async def kernel_in_process(root: Path, extra: dict[str, str]) -> AsyncIterator[Kernel]:
    """Boot a Kernel with the server's settings on its own store; always shut it down."""
    env = {k: v for k, v in extra.items() if k.startswith("KENSHO_")}
    env["KENSHO_STORAGE_ROOT"] = str(root)
    kernel = Kernel(load_settings(env=env, cwd=root.parent))
    try:
        await kernel.boot()
        yield kernel
    finally:
        await kernel.shutdown()


def _request(tokens: int) -> GenerationRequest:
    return GenerationRequest.chat([("user", PROMPT)], max_tokens=tokens, temperature=0.0)


async def via_runtime(kernel: Kernel, tokens: int) -> Sample:
    assert kernel.runtime is not None
    request = _request(tokens)
    start = time.perf_counter()
    first, count = 0.0, 0
    async for chunk in kernel.runtime.generate(request):
        if not count:
            first = time.perf_counter()
        count += chunk.tokens
    return _sample(start, first, count)


async def via_executor(kernel: Kernel, tokens: int) -> Sample:
    assert kernel.executor is not None
    request = _request(tokens)
    start = time.perf_counter()
    first, count = 0.0, 0
    async for chunk in kernel.executor.submit(request):
        if not count:
            first = time.perf_counter()
        count += chunk.tokens
    return _sample(start, first, count)


# -- HTTP clients ---------------------------------------------------------------------------


def _body(model_id: str, tokens: int, *, stream: bool) -> dict[str, object]:
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def via_httpx(client: httpx.Client, model_id: str, tokens: int) -> Sample:
    """Raw SSE: TTFT at the first event with text, tokens from the closing ``usage``
    (tokens that waited for this reader come merged into one event)."""
    start = time.perf_counter()
    first, count = 0.0, 0
    body = _body(model_id, tokens, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = orjson.loads(line[6:])
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
            elif not first and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    return _sample(start, first, count)


def via_openai(client: openai.OpenAI, model_id: str, tokens: int) -> Sample:
    start = time.perf_counter()
    first, count = 0.0, 0
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        for chunk in stream:
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
            elif not first and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
    return _sample(start, first, count)


async def via_async_openai(client: openai.AsyncOpenAI, model_id: str, tokens: int) -> Sample:
    start = time.perf_counter()
    first, count = 0.0, 0
    stream = await client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
            elif not first and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
    return _sample(start, first, count)


# -- latency: in process vs HTTP, interleaved ---------------------------------------------------

IN_PROCESS_BASELINE = "in process: TaskExecutor.submit()"
OPENAI_SYNC = "HTTP: openai.OpenAI, stream=True"
CLIENT_ALONE = "openai.OpenAI alone: same bytes replayed, no server"
Path_ = Callable[[int], Sample]


def _replay_client(url: str, sizes: tuple[int, ...], stack: contextlib.ExitStack) -> openai.OpenAI:
    """An openai client whose transport replays the server's own SSE bytes from memory."""
    recorded: dict[int, bytes] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for tokens in sizes:
            body = _body("mock", tokens, stream=True)
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            recorded[tokens] = response.content

    def replay(request: httpx.Request) -> httpx.Response:
        tokens = int(orjson.loads(request.content)["max_tokens"])
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, content=recorded[tokens])

    transport = httpx.Client(transport=httpx.MockTransport(replay))
    return stack.enter_context(
        openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, http_client=transport)
    )


def latency_paths(
    runner: asyncio.Runner,
    kernel: Kernel,
    url: str,
    model_id: str,
    sizes: tuple[int, ...],
    stack: contextlib.ExitStack,
) -> dict[str, Path_]:
    """One callable per path, each making one streamed request of ``tokens`` tokens."""
    raw = stack.enter_context(httpx.Client(base_url=url, timeout=120))
    sync_client = stack.enter_context(
        openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120)
    )
    async_client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120
    )
    stack.callback(lambda: runner.run(async_client.close()))

    def in_loop(make: Callable[[int], Awaitable[Sample]]) -> Path_:
        async def call(tokens: int) -> Sample:
            return await make(tokens)

        return lambda tokens: runner.run(call(tokens))

    paths: dict[str, Path_] = {
        "in process: RuntimeManager.generate()": in_loop(lambda n: via_runtime(kernel, n)),
        IN_PROCESS_BASELINE: in_loop(lambda n: via_executor(kernel, n)),
        "HTTP: httpx, raw SSE": lambda n: via_httpx(raw, model_id, n),
        OPENAI_SYNC: lambda n: via_openai(sync_client, model_id, n),
        "HTTP: openai.AsyncOpenAI, stream=True": in_loop(
            lambda n: via_async_openai(async_client, model_id, n)
        ),
    }
    if model_id == "mock":
        replayed = _replay_client(url, sizes, stack)
        paths[CLIENT_ALONE] = lambda n: via_openai(replayed, model_id, n)
    return paths


Samples = dict[tuple[str, int], list[Sample]]


def interleaved(
    paths: dict[str, Path_], sizes: tuple[int, ...], rounds: int, warmup: int
) -> Samples:
    """``rounds`` requests per path and size, paths in turn, order rotated each round."""
    names = list(paths)
    for _ in range(warmup):
        for name in names:
            for tokens in sizes:
                paths[name](tokens)
    samples: Samples = {(name, tokens): [] for name in names for tokens in sizes}
    for r in range(rounds):
        shift = r % len(names)
        for tokens in sizes:
            for name in names[shift:] + names[:shift]:
                samples[name, tokens].append(paths[name](tokens))
    return samples


def latency_table(samples: Samples, sizes: tuple[int, ...]) -> tuple[str, Samples]:
    """Medians per path: TTFT for each request size, tokens/s of the largest."""
    names = list(dict.fromkeys(name for name, _ in samples))
    big = max(sizes)

    def ttft(name: str, tokens: int) -> float:
        return statistics.median(s.ttft for s in samples[name, tokens])

    def tps(name: str) -> float:
        return statistics.median(s.tokens / s.total for s in samples[name, big])

    rows = []
    for name in names:
        row: list[object] = [name]
        for tokens in sizes:
            value = ttft(name, tokens)
            delta = value - ttft(IN_PROCESS_BASELINE, tokens)
            row += [
                f"{value * 1e3:.3f}",
                "—" if name == IN_PROCESS_BASELINE else f"{delta * 1e3:+.2f}",
            ]
        rate = tps(name)
        count = statistics.median(s.tokens for s in samples[name, big])
        row += [f"{count:g}", f"{rate:,.0f}", f"{rate / tps(IN_PROCESS_BASELINE):.2f}x"]
        rows.append(row)
    headers = ["path"]
    for tokens in sizes:
        headers += [f"TTFT, {tokens}-token request (ms)", "vs executor (ms)"]
    headers += ["tokens", "tokens/s", "tokens/s vs executor"]
    return markdown_table(headers, rows), samples


def run_latency(
    tmp: Path,
    extra: dict[str, str],
    model_id: str,
    sizes: tuple[int, ...],
    rounds: int,
    warmup: int,
) -> tuple[str, Samples]:
    with (
        asyncio.Runner() as runner,
        kensho_up(tmp / "server", extra) as server,
        contextlib.ExitStack() as stack,
    ):
        kernel_cm = kernel_in_process(tmp / "in-process" / "kensho", extra)
        kernel = runner.run(kernel_cm.__aenter__())
        stack.push(lambda *exc: runner.run(kernel_cm.__aexit__(*exc)))
        paths = latency_paths(runner, kernel, server.url, model_id, sizes, stack)
        samples = interleaved(paths, sizes, rounds, warmup)
    return latency_table(samples, sizes)


# -- throughput: requests/s at a fixed concurrency ------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies: list[float]
    statuses: Counter[int]
    server_cpu: float | None
    client_cpu: float


async def sustain(
    url: str, pid: int, *, stream: bool, concurrency: int, duration: float, warmup: float
) -> LoadResult:
    """``concurrency`` clients back to back; count what completes in the timed window."""
    body = _body("mock", LOAD_TOKENS, stream=stream)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done: list[tuple[float, float, int]] = []
    loop_start = time.perf_counter()
    window = (loop_start + warmup, loop_start + warmup + duration)
    marks: dict[str, tuple[float | None, float]] = {}

    async def one(client: httpx.AsyncClient) -> int:
        if not stream:
            response = await client.post("/v1/chat/completions", json=body)
            return response.status_code
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            tail = b""
            async for piece in response.aiter_raw():
                tail = (tail + piece)[-32:]
            ok = response.status_code == 200 and tail.endswith(b"data: [DONE]\n\n")
            return response.status_code if ok else -1

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < window[1]:
            started = time.perf_counter()
            status = await one(client)
            done.append((started, time.perf_counter(), status))

    async def sampler() -> None:
        for name, at in zip(("start", "end"), window, strict=True):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            marks[name] = (_cpu_seconds(pid), time.process_time())

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(concurrency)))
    timed = [(s, e, status) for s, e, status in done if window[0] <= e <= window[1]]
    (server0, client0), (server1, client1) = marks["start"], marks["end"]
    server_cpu = None if server0 is None or server1 is None else server1 - server0
    return LoadResult(
        requests=len(timed),
        seconds=duration,
        latencies=[e - s for s, e, _ in timed],
        statuses=Counter(status for _, _, status in timed),
        server_cpu=server_cpu,
        client_cpu=client1 - client0,
    )


def run_throughput(
    tmp: Path, configs: list[tuple[str, dict[str, str]]], args: argparse.Namespace
) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for n, (limits, extra) in enumerate(configs):
        with kensho_up(tmp / f"throughput-{n}", {**MOCK_ENV, **extra}) as server:
            for stream in (False, True):
                result = asyncio.run(
                    sustain(
                        server.url,
                        server.process.pid,
                        stream=stream,
                        concurrency=args.concurrency,
                        duration=args.duration,
                        warmup=args.warmup,
                    )
                )
                ok = result.statuses.get(200, 0)
                other = result.requests - ok
                server_cpu = (
                    "n/a"
                    if result.server_cpu is None
                    else f"{result.server_cpu / result.seconds * 100:.0f}%"
                )
                rows.append(
                    (
                        "streaming" if stream else "non-streaming",
                        limits,
                        f"{ok / result.seconds:,.0f}",
                        f"{statistics.median(result.latencies) * 1e3:.1f}",
                        f"{_pct(result.latencies, 99) * 1e3:.1f}",
                        f"{other}",
                        server_cpu,
                        f"{result.client_cpu / result.seconds * 100:.0f}%",
                    )
                )
    return rows


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--mock-rounds", type=int, default=300, help="requests per path, mock")
    parser.add_argument("--demo-rounds", type=int, default=21, help="requests per path, demo")
    parser.add_argument("--concurrency", type=int, default=16, help="clients, throughput run")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds timed per load")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before timing")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, in process and in the server (OMP_NUM_THREADS)",
    )
    parser.add_argument("--skip-demo", action="store_true", help="mock engine only")
    args = parser.parse_args()
    configure_logging(level="error")  # no GPU here is expected, not news
    torch.set_num_threads(args.threads)
    threads = {"OMP_NUM_THREADS": str(args.threads)}
    raised = str(args.concurrency)
    throughput_configs = [
        ("default (gpu 4, queue 100)", {}),
        (
            f"gpu {raised}, queue 1000",
            {
                "KENSHO_RUNTIME_CONCURRENCY": f"gpu={raised},cpu={raised}",
                "KENSHO_RUNTIME_MAX_QUEUE_SIZE": "1000",
            },
        ),
    ]
    sizes = (1, args.tokens)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kensho-server-bench-") as name:
        tmp = Path(name)
        mock_table, mock = run_latency(
            tmp / "mock", MOCK_ENV, "mock", sizes, args.mock_rounds, warmup=20
        )
        demo_table = None
        if not args.skip_demo:
            demo_table, _ = run_latency(
                tmp / "demo", threads, "kensho-demo", (args.tokens,), args.demo_rounds, warmup=2
            )
        throughput = run_throughput(tmp, throughput_configs, args)

    versions = ", ".join(
        f"{p} {version(p)}" for p in ("uvicorn", "fastapi", "httpx", "openai", "torch")
    )
    load = ", ".join(f"{x:.2f}" for x in load_before)
    print(f"server_bench: {machine_line()}; {versions}; load average before: {load}")
    print()
    print(
        "Zero-latency fault-injecting engine (mock), one streamed chat completion at a time; "
        f"medians of {args.mock_rounds} requests per path and size, interleaved. The mock "
        "never waits, so the executor buffers the whole stream (up to 64 chunks) before the "
        "first read: TTFT of the long request includes producing it, on every path."
    )
    print()
    print(mock_table)
    print()

    def median_ttft(name: str, tokens: int) -> float:
        return statistics.median(s.ttft for s in mock[name, tokens]) * 1e3

    for tokens in sizes:
        added = median_ttft(OPENAI_SYNC, tokens) - median_ttft(IN_PROCESS_BASELINE, tokens)
        verdict = "met" if added < 2.0 else "NOT met"
        print(
            f"- {tokens}-token request: HTTP with the openai client adds {added:.2f} ms to "
            f"TTFT (target < 2 ms: {verdict}); the openai client alone, with no server and "
            f"no socket, takes {median_ttft(CLIENT_ALONE, tokens):.2f} ms of it."
        )
    if demo_table is not None:
        print()
        print(
            f"Embedded demo model (kensho-demo, TorchEngine on CPU, {args.threads} torch "
            f"thread(s), greedy), prompt {PROMPT!r}, max_tokens {args.tokens} (it stops "
            f"earlier at end of text); medians of {args.demo_rounds} requests per path, "
            "interleaved:"
        )
        print()
        print(demo_table)
    print()
    print(
        f"Sustained load: {args.concurrency} concurrent clients (httpx.AsyncClient, "
        f"keep-alive), chat completions of {LOAD_TOKENS} tokens back to back on the "
        f"zero-latency mock, {args.duration:g} s timed after {args.warmup:g} s warm-up. "
        "'limits' are the executor's (KENSHO_RUNTIME_CONCURRENCY, "
        "KENSHO_RUNTIME_MAX_QUEUE_SIZE); CPU is per process, 100% = one core; client and "
        "server share the machine's CPUs:"
    )
    print()
    print(
        markdown_table(
            [
                "request",
                "limits",
                "requests/s",
                "latency p50 (ms)",
                "latency p99 (ms)",
                "not 200",
                "server CPU",
                "client CPU",
            ],
            throughput,
        )
    )


if __name__ == "__main__":
    main()
