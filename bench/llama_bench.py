"""LlamaCppEngine vs raw llama-cpp-python vs TorchEngine on the demo model, CPU.

Measures time to first token (TTFT) and decode speed (tokens/s), greedy, same prompt,
same thread count for every contender:

- raw ``llama_cpp.Llama.generate()`` in this process (the floor: no process boundary);
- ``LlamaCppEngine`` direct (child process, pipe, event-loop hand-off), F32 and Q8_0;
- ``LlamaCppEngine`` via ``RuntimeManager`` (breaker, hang detection), as the server;
- ``TorchEngine`` on the same weights (transformers folder);
- with ``--http``: ``kensho up --engine llama`` and llama-cpp-python's own OpenAI server
  (``python -m llama_cpp.server``), both on the F32 GGUF and read by the same ``openai``
  client (streamed ``/v1/completions``, same prompt and ``max_tokens``, temperature 0),
  on llama-cpp-python's default thread counts (see ``_http_contenders``).

The hand-off cost per chunk is measured two ways: (1/engine tokens/s - 1/raw tokens/s),
what the process boundary and the event loop add per token on top of llama.cpp's own
decode (noisy on a shared machine), and the server process's own CPU time per chunk
(``time.process_time``: reading the pipe, unpickling, waking the consumer, yielding;
the decode runs in the child and is not in it), which load on other cores does not
inflate. Rounds interleave the contenders, so drift in load hits them all alike; medians.

    .venv/bin/python bench/llama_bench.py [--tokens 200] [--rounds 11] [--threads 1] [--http]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _http_contenders import THREADS, HttpStream, kensho_server, peer_server, ttft_spread
from _table import machine_line, markdown_table
from kensho.demo import DEMO_MODEL_DIR
from kensho.runtime.engines.base import GenerationChunk, GenerationRequest
from kensho.runtime.engines.llama_engine import LlamaCppEngine
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.manager import RuntimeManager
from kensho.telemetry import configure_logging

PROMPT = "The GPU"
KENSHO_HTTP = "Kensho over HTTP, openai client (F32)"
PEER_HTTP = "llama_cpp.server over HTTP, openai client (F32)"
Round = Callable[[int], Any]


class RawLlama:
    """llama-cpp-python in this process: tokenize, then ``generate`` token by token."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=0,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    async def round(self, tokens: int) -> tuple[float, float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        ids = self.llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
        stream = self.llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, temp=0.0, reset=True)
        first, count = 0.0, 0
        for token in stream:
            self.llm.detokenize([token])
            count += 1
            if count == 1:
                first = time.perf_counter() - start
            if count == tokens:
                break
        stream.close()
        self.llm.reset()  # no KV reuse between rounds: every contender reads the prompt
        return first, count / (time.perf_counter() - start), (time.process_time() - cpu) / count


_WRITER = """
import socket, sys, time
s = socket.socket(fileno=int(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    while time.perf_counter() - t < 0.0005:  # about one token apart, as a decoding child
        pass
    s.send(b"x" * 40)
"""


async def wake_floor(messages: int = 2000) -> float:
    """Server CPU per message of a bare ``add_reader`` wake-up fed by another process.

    The floor under any per-token hand-off from a child process: the engine's own
    cost per chunk is its "server CPU µs/chunk" minus this.
    """
    import socket
    import subprocess

    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-c", _WRITER, str(theirs.fileno()), str(messages)]
    writer = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))  # noqa: ASYNC220 - a bench helper
    theirs.close()
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(ours.fileno(), lambda: inbox.put_nowait(ours.recv(1 << 16)))
    cpu, count = time.process_time(), 0
    while await inbox.get():
        count += 1
    loop.remove_reader(ours.fileno())
    ours.close()
    await asyncio.to_thread(writer.wait)
    return (time.process_time() - cpu) / count


def _task_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread (``/proc/PID/schedstat``, in ns): the
    llama.cpp child decodes on its main thread with one thread."""
    with open(f"/proc/{pid}/schedstat") as f:  # noqa: PTH123 - a bench helper
        return int(f.read().split()[0]) / 1e9


class Streamed:
    """One streamed request through an engine or the runtime manager.

    With ``pid`` (the engine's child), each round also notes the child's CPU per token
    in ``child_cpu``: its decode plus its side of the hand-off.
    """

    def __init__(
        self,
        generate: Callable[[GenerationRequest], AsyncIterator[GenerationChunk]],
        pid: Callable[[], int | None] | None = None,
    ):
        self.generate = generate
        self.pid = pid
        self.child_cpu: list[float] = []

    async def round(self, tokens: int) -> tuple[float, float, float]:
        request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0)
        pid = self.pid() if self.pid is not None else None
        child = _task_cpu(pid) if pid is not None else 0.0
        start, cpu = time.perf_counter(), time.process_time()
        first, count = 0.0, 0
        async for chunk in self.generate(request):
            if not count:
                first = time.perf_counter() - start
            count += chunk.tokens  # a chunk is several tokens when this loop was behind
        elapsed = time.perf_counter() - start
        cpu_per_token = (time.process_time() - cpu) / count
        if pid is not None:
            self.child_cpu.append((_task_cpu(pid) - child) / count)
        return first, count / elapsed, cpu_per_token


async def measure(
    tokens: int, rounds: int, threads: int, http: bool
) -> tuple[dict[str, tuple[float, float, float, float]], list[str]]:
    """Medians per contender (TTFT, tokens/s, server CPU and child CPU per token), and
    notes on the HTTP contenders' texts."""
    import torch

    torch.set_num_threads(threads)
    f32, q8 = DEMO_MODEL_DIR / "model.gguf", DEMO_MODEL_DIR / "model-q8_0.gguf"
    llama = LlamaCppEngine(f32, n_threads=threads)
    llama_q8 = LlamaCppEngine(q8, n_threads=threads, name="cpu-q8")
    torch_engine = TorchEngine(DEMO_MODEL_DIR)
    behind = LlamaCppEngine(f32, n_threads=threads, name="managed")
    manager = RuntimeManager(behind)
    for engine in (llama, llama_q8, torch_engine):
        await engine.load()
    await manager.start()
    paths: dict[str, Any] = {
        "llama-cpp-python in process (F32)": RawLlama(f32, threads),
        "LlamaCppEngine direct (F32)": Streamed(llama.generate, lambda: llama.pid),
        "LlamaCppEngine via RuntimeManager (F32)": Streamed(manager.generate, lambda: behind.pid),
        "LlamaCppEngine direct (Q8_0)": Streamed(llama_q8.generate, lambda: llama_q8.pid),
        "TorchEngine direct (safetensors F32)": Streamed(torch_engine.generate),
    }
    notes: list[str] = []
    async with contextlib.AsyncExitStack() as servers:
        if http:
            kensho_url = await servers.enter_async_context(kensho_server())
            peer_url = await servers.enter_async_context(peer_server(f32))
            paths[KENSHO_HTTP] = HttpStream(kensho_url, PROMPT)
            paths[PEER_HTTP] = HttpStream(peer_url, PROMPT)
        samples = await interleave(paths, tokens, rounds)
        if http:
            notes.append(_compare_texts(paths))
            notes.append(ttft_spread(paths[KENSHO_HTTP], paths[PEER_HTTP]))
            await paths[KENSHO_HTTP].close()
            await paths[PEER_HTTP].close()
    await manager.close()
    for engine in (llama, llama_q8, torch_engine):
        await engine.close()
    medians = {
        name: (
            *(statistics.median(run[i] for run in runs) for i in range(3)),
            _child_median(paths[name]),
        )
        for name, runs in samples.items()
    }
    return medians, notes  # type: ignore[return-value]


def _child_median(path: Any) -> float:
    """The median child CPU per token of a path with a child (warm-up left out); the
    in-process contender's own CPU is its decode; NaN for the rest."""
    cpu = getattr(path, "child_cpu", None)
    return statistics.median(cpu[1:]) if cpu and len(cpu) > 1 else float("nan")


async def interleave(
    paths: dict[str, Any], tokens: int, rounds: int
) -> dict[str, list[tuple[float, float, float]]]:
    """Every round runs every contender once, so drift in load hits them all alike."""
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in paths}
    for i in range(rounds + 1):
        for name, path in paths.items():
            result = await path.round(tokens)
            if i:  # round 0 warms every path up
                samples[name].append(result)
    return samples


def _compare_texts(paths: dict[str, Any]) -> str:
    """How far the two servers' greedy texts agree, and how many tokens each streamed.

    Both must stream the same number of tokens for the race to be fair; the texts
    may part late in a long greedy run, where the demo model's top logits nearly tie
    and llama.cpp's float sums (batch sizes, KV reuse) tip them either way.
    """
    ours, peer = paths[KENSHO_HTTP], paths[PEER_HTTP]
    a, b = "".join(ours.texts), "".join(peer.texts)
    same = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    if ours.tokens != peer.tokens:
        raise SystemExit(f"the HTTP contenders streamed {ours.tokens} and {peer.tokens} tokens")
    return (
        f"HTTP texts: {ours.tokens} tokens each (Kensho in {len(ours.texts)} events, "
        f"llama_cpp.server in {len(peer.texts)}); identical for the first {same} of "
        f"{len(a)} / {len(b)} characters"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--http",
        action="store_true",
        help="also kensho up and llama_cpp.server over HTTP (needs llama-cpp-python[server])",
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    results, notes = asyncio.run(measure(args.tokens, args.rounds, args.threads, args.http))
    floor = asyncio.run(wake_floor())
    _, raw_tps, raw_cpu, _ = results["llama-cpp-python in process (F32)"]
    rows = []
    for name, (ttft, tps, cpu, child) in results.items():
        handoff = (1 / tps - 1 / raw_tps) * 1e6
        rows.append(
            (
                name,
                f"{ttft * 1e3:.2f}",
                f"{tps:.0f}",
                f"{tps / raw_tps:.2f}x",
                f"{handoff:+.0f}",
                "" if math.isnan(cpu) else f"{cpu * 1e6:.0f}",
                "" if math.isnan(child) else f"{child * 1e6:.0f} ({(child - raw_cpu) * 1e6:+.0f})",
            )
        )
    sizes = {p.name: p.stat().st_size for p in DEMO_MODEL_DIR.glob("*.gguf")}
    print(
        f"llama_bench: demo model, prompt {PROMPT!r}, {args.tokens} tokens greedy, "
        f"{args.rounds} rounds, medians, {args.threads} thread(s); {machine_line()}; "
        + ", ".join(f"{n} {s / 1024:.0f} KiB" for n, s in sorted(sizes.items()))
    )
    print()
    print(
        markdown_table(
            [
                "path",
                "TTFT (ms)",
                "tokens/s",
                "vs in-process",
                "µs/token vs in-process",
                "server CPU µs/token",
                "child CPU µs/token (vs in-process)",
            ],
            rows,
        )
    )
    print()
    print(
        f"bare asyncio add_reader wake-up, fed by another process: {floor * 1e6:.0f} µs CPU/message"
    )
    if args.http:
        print(_http_verdict(results))
    for note in notes:
        print(note)


def _http_verdict(results: dict[str, tuple[float, float, float, float]]) -> str:
    """(d) against (e): the targets are >= 0.95x the tokens/s and TTFT within 1 ms."""
    ours_ttft, ours_tps, _, _ = results[KENSHO_HTTP]
    peer_ttft, peer_tps, _, _ = results[PEER_HTTP]
    return (
        f"HTTP, {THREADS[0]} decode / {THREADS[1]} prompt thread(s) each: Kensho "
        f"{ours_tps / peer_tps:.2f}x the tokens/s of llama_cpp.server (target >= 0.95x), "
        f"TTFT {(ours_ttft - peer_ttft) * 1e3:+.2f} ms (target within 1 ms)"
    )


if __name__ == "__main__":
    main()
