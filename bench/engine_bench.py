"""TorchEngine, in the server's process and in its own, vs plain ``model.generate()``.

Measures time to first token (TTFT) and decode speed (tokens/s) of:

- ``model.generate()`` — transformers' own loop, greedy, no streaming;
- ``TorchEngine`` directly — Kensho's streaming KV-cache loop in a worker thread;
- ``TorchProcessEngine`` directly — the same loop in a child process (the server's
  default, ``[model] isolate = true``), tokens over a pipe;
- ``RuntimeManager`` — either engine behind the circuit breaker, as the server uses it.

The CPU columns of the child-process paths count the child's threads too.

TTFT of plain ``generate`` is the time of ``generate(max_new_tokens=1)``. Medians over
rounds. Device: CPU by default; ``--device cuda`` when a GPU is at hand.

    .venv/bin/python bench/engine_bench.py [--model DIR] [--device cpu] [--tokens 96]
        [--handoff-alone]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from _table import machine_line, markdown_table, process_cpu
from kensho.demo import DEMO_MODEL_DIR
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.engines.torch_process import TorchProcessEngine
from kensho.runtime.manager import RuntimeManager
from kensho.telemetry import configure_logging

PROMPT = "The GPU"


class PlainGenerate:
    """transformers' own ``generate()``: TTFT is a 1-token generate, speed a long one."""

    def __init__(self, model_dir: Path, device: str) -> None:
        self.device = device
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        self.model.to(device).eval()
        self.ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        self.kwargs = {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": None}

    def _timed(self, n: int) -> tuple[float, int, float]:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, **self.kwargs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        count = out.shape[1] - self.ids.shape[1]
        return time.perf_counter() - start, count, time.process_time() - cpu

    async def round(self, tokens: int) -> tuple[float, float, float]:
        ttft = self._timed(1)[0]
        elapsed, count, cpu = self._timed(tokens)
        return ttft, count / elapsed, cpu / count


class SameThreadLoop:
    """Kensho's decode loop called directly on this thread: no streaming hand-off.

    Shows how the streamed paths' cost splits between the loop itself and the
    hand-off from the worker thread to the event loop, two ways: the time per token it
    adds (``1/streamed tokens/s - 1/same-thread tokens/s``, noisy on a shared machine)
    and the CPU time per token it adds (this process's ``time.process_time``, all
    threads: the worker's hand-over, the loop's wake-up, the consumer), which load on
    other cores barely inflates.
    """

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine

    async def round(self, tokens: int) -> tuple[float, float, float]:
        request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0)
        times: list[float] = []
        start, cpu = time.perf_counter(), time.process_time()

        def put(_: object) -> None:
            times.append(time.perf_counter() - start)

        self.engine._decode(request, put, threading.Event())
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        return times[0], len(times) / elapsed, cpu / len(times)


_LOOP_WORKER = """
import json, sys, threading, time
sys.path[:] = json.loads(sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[3]))
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.torch_engine import TorchEngine
engine = TorchEngine(sys.argv[2], device=sys.argv[4])
engine.load_blocking()
print("ready", flush=True)
for line in sys.stdin:
    request = GenerationRequest(prompt=sys.argv[5], max_tokens=int(line), temperature=0)
    times = []
    start, cpu = time.perf_counter(), time.process_time()
    put = lambda _: times.append(time.perf_counter() - start)
    engine.run_blocking(request, put, threading.Event())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps([times[0], len(times) / elapsed, cpu / len(times)]), flush=True)
"""


class OwnProcessLoop:
    """The same-thread loop again, in a process of its own like TorchProcessEngine's child.

    The baseline of the child-process paths: the same code in the same kind of process
    (a small heap, a core of its own), with no streaming hand-off. The server's process
    holds more (two engines, the event loop), which changes a decode step's speed by
    itself, in either direction.
    """

    def __init__(self, model_dir: Path, device: str, threads: int) -> None:
        argv = [sys.executable, "-I", "-c", _LOOP_WORKER, json.dumps(sys.path), str(model_dir)]
        self.proc = subprocess.Popen(
            [*argv, str(threads), device, PROMPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the same-thread loop's process did not start")

    def _ask(self, tokens: int) -> tuple[float, float, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{tokens}\n")
        self.proc.stdin.flush()
        first, tps, cpu = json.loads(self.proc.stdout.readline())
        return first, tps, cpu

    async def round(self, tokens: int) -> tuple[float, float, float]:
        return await asyncio.to_thread(self._ask, tokens)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Streamed:
    """One streamed request through ``source``: TTFT and tokens/s of the whole stream.

    The CPU per token is the decoding process's: this one for TorchEngine, the child's
    for a TorchProcessEngine (``child``), whose server side is noted in ``server_cpu``.
    """

    def __init__(
        self,
        source: TorchEngine | TorchProcessEngine | RuntimeManager,
        child: TorchProcessEngine | None = None,
    ) -> None:
        self.source = source
        self.child = child
        self.server_cpu: list[float] = []

    def _cpu(self) -> tuple[float, float]:
        pid = self.child.pid if self.child is not None else None
        return time.process_time(), process_cpu(pid) if pid is not None else 0.0

    async def round(self, tokens: int) -> tuple[float, float, float]:
        request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0)
        own, child = self._cpu()  # first: reading /proc takes a while
        start = time.perf_counter()
        first = 0.0
        count = 0
        async for chunk in self.source.generate(request):
            if not count:
                first = time.perf_counter() - start
            count += chunk.tokens  # a chunk is several tokens when this loop was behind
        elapsed = time.perf_counter() - start
        own_after, child_after = self._cpu()
        if self.child is None:
            return first, count / elapsed, (own_after - own) / count
        self.server_cpu.append((own_after - own) / count)
        return first, count / elapsed, (child_after - child) / count


def _busy(seconds: float) -> None:
    """Spin for ``seconds``, holding the GIL: a decode step's Python side, or a consumer's work."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _per_token_calls(items: int, pace: float, work_per_chunk: float) -> None:
    """The hand-off before ThreadHandoff: one ``call_soon_threadsafe`` per token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[int | None] = asyncio.Queue()

    def work() -> None:
        for i in range(items):
            _busy(pace)
            loop.call_soon_threadsafe(queue.put_nowait, i)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    worker = threading.Thread(target=work)
    worker.start()
    while await queue.get() is not None:
        _busy(work_per_chunk)
    worker.join()


async def _thread_handoff(items: int, pace: float, work_per_chunk: float) -> None:
    """TorchEngine's hand-off: every ready token per loop wake-up."""
    from kensho.runtime.engines._handoff import ThreadHandoff  # absent before it existed
    from kensho.runtime.engines.torch_engine import WINDOW

    handoff: ThreadHandoff[int | None] = ThreadHandoff(asyncio.get_running_loop(), window=WINDOW)

    def work() -> None:
        for i in range(items):
            _busy(pace)
            handoff.put(i)
        handoff.put(None)

    worker = threading.Thread(target=work)
    worker.start()
    done = False
    while not done:
        for item in await handoff.take():
            done = item is None
            if not done:
                _busy(work_per_chunk)
    worker.join()


_PIPE_WORKER = """
import sys, time
sys.path[:] = sys.argv[4:]
from multiprocessing.connection import Connection
from kensho.runtime.engines.llama_child import Channel
channel = Channel(Connection(int(sys.argv[1])))
items, pace = int(sys.argv[2]), float(sys.argv[3])
channel.send(("ready", {}))
channel.take(block=True)  # go
for i in range(items):
    end = time.perf_counter() + pace
    while time.perf_counter() < end:
        pass
    channel.send(("tok", "r", " x", i, "length" if i == items - 1 else None, None, ()))
channel.take(block=True)  # until the parent closes the pipe
"""


async def _pipe_handoff(items: int, pace: float, work_per_chunk: float) -> float:
    """The child-process engines' hand-off: a worker in its own process, the pipe, the
    event loop's reader (``_process.ChildProcess``), every ready token per wake-up."""
    from kensho.runtime.engines._process import ChildProcess, Stream

    stream = Stream()

    def argv(fd: int) -> list[str]:
        return [sys.executable, "-I", "-c", _PIPE_WORKER, str(fd), str(items), str(pace), *sys.path]

    proc, conn = await asyncio.to_thread(ChildProcess.spawn, argv, engine="bench", what="worker")
    child = ChildProcess(
        proc, conn, engine="bench", what="worker", dispatch=lambda _, m: stream.push(m)
    )
    try:
        await child.hello  # its imports done
        start = time.perf_counter()
        child.send(("go",))
        done = False
        while not done:
            message = await stream.get()
            batch = [message, *stream.messages]
            stream.messages.clear()
            done = batch[-1][4] is not None
            _busy(work_per_chunk)
        return time.perf_counter() - start
    finally:
        await child.reap()


async def handoff_alone(items: int = 2000, pace: float = 0.0008, rounds: int = 5) -> list[str]:
    """Time per token each hand-off adds to a worker that makes a token every ``pace``.

    The worker spins in Python for ``pace`` (holding the GIL, as the Python side of a
    small model's decode step does), so the loop thread must win the GIL to take each
    token: the cost is wall time beyond ``pace`` per token. In the second case the
    consumer spends ``pace / 2`` per chunk too (the server encodes and writes an SSE
    event), so tokens pile up while it works. Rounds interleave the hand-offs. The
    pipe's worker spins in its own process (its GIL is its own): only the pipe and the
    loop's reader are between it and the consumer.
    """
    paths = {
        "one call_soon_threadsafe per token (before)": _per_token_calls,
        "ThreadHandoff, all ready tokens per wake-up": _thread_handoff,
        "pipe from a child process (TorchProcessEngine, LlamaCppEngine)": _pipe_handoff,
    }
    lines = []
    for work_per_chunk in (0.0, pace / 2):
        costs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, run in paths.items():
                start = time.perf_counter()
                timed = await run(items, pace, work_per_chunk)
                elapsed = timed if timed is not None else time.perf_counter() - start
                costs[name].append(elapsed / items - pace)
        for name, runs in costs.items():
            lines.append(
                f"consumer work {work_per_chunk * 1e3:.1f} ms/chunk, {name}: "
                f"{statistics.median(runs) * 1e6:+.0f} µs/token beyond the worker's own"
            )
    return lines


Row = tuple[float, float, float, float, float, float | None]
_LOOP = "Kensho decode loop, same thread (no streaming)"
_OWN_LOOP = "Kensho decode loop, same thread, a process of its own"


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` (threads it starts later inherit it) on ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


async def measure(
    model_dir: Path, device: str, tokens: int, rounds: int, threads: int, *, pin: bool = False
) -> dict[str, Row]:
    """Rounds interleave the paths, so drift in machine load hits them all alike.

    Per path: medians of TTFT, tokens/s and CPU per token, then the hand-off's time and
    CPU per token, each the median over rounds of the difference with the same-thread
    loop *of the same round* (paired: this VM's speed drifts from minute to minute) in
    the same kind of process: the server's for TorchEngine, one of its own for
    TorchProcessEngine.
    """
    engine = TorchEngine(model_dir, device=device)
    await engine.load()
    manager = RuntimeManager(engine)
    await manager.start()
    child = TorchProcessEngine(model_dir, device=device, threads=threads)
    await child.load()
    child_manager = RuntimeManager(child)
    await child_manager.start()
    own_loop = OwnProcessLoop(model_dir, device, threads)
    if pin and child.pid is not None:
        # Both single-threaded child decoders on the same core: the scheduler moving
        # them between cores is then no part of their comparison.
        for pid in (child.pid, own_loop.proc.pid):
            _pin(pid, {os.cpu_count() - 1 if os.cpu_count() else 0})
    paths = {
        "transformers model.generate()": PlainGenerate(model_dir, device),
        _LOOP: SameThreadLoop(engine),
        _OWN_LOOP: own_loop,
        "TorchEngine (direct)": Streamed(engine),
        "TorchEngine via RuntimeManager": Streamed(manager),
        "TorchProcessEngine (direct)": Streamed(child, child),
        "TorchProcessEngine via RuntimeManager": Streamed(child_manager, child),
    }
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in paths}
    for i in range(rounds + 1):
        for name, path in paths.items():
            result = await path.round(tokens)
            if i:  # round 0 warms every path up
                samples[name].append(result)
    await manager.close()
    await child_manager.close()
    own_loop.close()
    rows: dict[str, Row] = {}
    for name, runs in samples.items():
        loop = samples[_OWN_LOOP if "Process" in name else _LOOP]
        ttft, tps, cpu = (statistics.median(run[i] for run in runs) for i in range(3))
        extra = statistics.median(1 / r[1] - 1 / b[1] for r, b in zip(runs, loop, strict=True))
        extra_cpu = statistics.median(r[2] - b[2] for r, b in zip(runs, loop, strict=True))
        path = paths[name]
        server = path.server_cpu if isinstance(path, Streamed) and path.server_cpu else None
        rows[name] = (
            ttft,
            tps,
            cpu,
            extra,
            extra_cpu,
            statistics.median(server) if server else None,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: a tiny model on 2 vCPUs is fastest single-threaded)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run both child-process decoders (engine and baseline) on the last CPU",
    )
    parser.add_argument(
        "--handoff-alone",
        action="store_true",
        help="also time the worker-to-loop hand-off alone, before vs ThreadHandoff",
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = asyncio.run(
        measure(args.model, args.device, args.tokens, args.rounds, args.threads, pin=args.pin)
    )
    handoffs = asyncio.run(handoff_alone()) if args.handoff_alone else []
    base_ttft, base_tps, *_ = results["transformers model.generate()"]
    rows = [
        (
            name,
            f"{ttft * 1e3:.2f}",
            f"{(ttft / base_ttft - 1) * 100:+.1f}%",
            f"{tps:.0f}",
            f"{(1 - tps / base_tps) * 100:+.1f}%",
            f"{extra * 1e6:+.0f}" if "Engine" in name else "",
            f"{extra_cpu * 1e6:+.0f}" if "Engine" in name else "",
            f"{server * 1e6:.0f}" if server is not None else "",
        )
        for name, (ttft, tps, _, extra, extra_cpu, server) in results.items()
    ]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(
        f"engine_bench: {args.model.name}, prompt {PROMPT!r}, {args.tokens} tokens greedy, "
        f"{args.rounds} rounds, medians; device {device}; {machine_line()}"
    )
    print()
    print(
        markdown_table(
            [
                "path",
                "TTFT (ms)",
                "TTFT vs generate()",
                "tokens/s",
                "overhead vs generate()",
                "hand-off µs/token (paired)",
                "decoding process's CPU µs/token beyond the loop (paired)",
                "server CPU µs/token (child paths)",
            ],
            rows,
        )
    )
    if handoffs:
        print()
        print("hand-off alone, a worker making a token every 0.8 ms (medians of 5 x 2000):")
    for line in handoffs:
        print(f"- {line}")


if __name__ == "__main__":
    main()
