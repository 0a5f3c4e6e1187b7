"""The HTTP contenders of llama_bench: ``kensho up --engine llama`` and llama.cpp's server.

Both serve the demo's F32 GGUF on 127.0.0.1 and are read by the same ``openai``
client, streaming ``/v1/completions`` with the same prompt, ``max_tokens`` and
temperature 0 (greedy). Thread counts: ``kensho up`` leaves them to llama-cpp-python's
defaults (decode ``cpu_count // 2``, prompt ``cpu_count``); the peer is given exactly
those on its command line, so both decode on the same number of threads.

The peer is ``python -m llama_cpp.server`` (``pip install 'llama-cpp-python[server]'``),
what a user moving from llama.cpp would run instead of Kensho.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai

__all__ = ["THREADS", "HttpStream", "kensho_server", "peer_server", "ttft_spread"]

BOOT_TIMEOUT = 120.0
#: (decode, prompt) threads: llama-cpp-python's defaults, which ``kensho up`` uses.
THREADS = (max((os.cpu_count() or 1) // 2, 1), os.cpu_count() or 1)


def _env(home: Path) -> dict[str, str]:
    """A fresh HOME for ``kensho up`` (the store is set up from the demo, offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KENSHO_")}
    env.update(XDG_DATA_HOME=str(home), HOME=str(home), KENSHO_SERVER_PORT="0")
    env.update(KENSHO_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    return env


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.asynccontextmanager
async def kensho_server() -> AsyncIterator[str]:
    """``kensho up --engine llama`` from a fresh HOME; yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="kensho-bench-") as home:
        argv = [sys.executable, "-m", "kensho", "up", "--engine", "llama"]
        process = subprocess.Popen(  # noqa: ASYNC220 - a bench helper
            argv,
            cwd=home,
            env=_env(Path(home)),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert process.stdout is not None
            url = ""
            while not url:
                line = await asyncio.to_thread(process.stdout.readline)
                if not line:
                    raise RuntimeError(f"kensho up exited with {process.wait()}")
                if line.startswith("kensho: listening on "):
                    url = line.split()[-1].rstrip("/")
            yield url
        finally:
            await asyncio.to_thread(_stop, process)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def peer_server(model: Path) -> AsyncIterator[str]:
    """``python -m llama_cpp.server`` on ``model``; yields its base URL once it answers."""
    port = _free_port()
    decode, prompt = THREADS
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "0"]
    argv += ["--n_threads", str(decode), "--n_threads_batch", str(prompt), "--verbose", "False"]
    process = subprocess.Popen(  # noqa: ASYNC220 - a bench helper
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        async with httpx.AsyncClient() as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{url}/v1/models")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not answer in time")
                await asyncio.sleep(0.2)  # a bench polling a booting server, not a test
        yield url
    finally:
        await asyncio.to_thread(_stop, process)


class HttpStream:
    """One streamed ``/v1/completions`` request with the openai client."""

    def __init__(self, url: str, prompt: str) -> None:
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)
        self.prompt = prompt
        self.model = ""
        self.texts: list[str] = []  # the last round's text, to check the contenders agree
        self.tokens = 0  # the last round's tokens
        self.ttfts: list[float] = []  # every round's, the warm-up round first

    async def round(self, tokens: int) -> tuple[float, float, float]:
        """TTFT (first chunk with text), tokens/s over the whole stream, no CPU figure.

        Tokens are the server's ``usage`` when it sends one (Kensho merges the tokens
        that wait for a slow reader into one event), else one per text event
        (llama_cpp.server sends every token as its own event and has no
        ``stream_options``; it ignores the field).
        """
        if not self.model:
            self.model = (await self.client.models.list()).data[0].id
        start = time.perf_counter()
        first, texts, usage = 0.0, [], None
        stream = await self.client.completions.create(
            model=self.model,
            prompt=self.prompt,
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            usage = chunk.usage or usage
            text = chunk.choices[0].text if chunk.choices else ""
            if not text:
                continue
            texts.append(text)
            if len(texts) == 1:
                first = time.perf_counter() - start
        elapsed = time.perf_counter() - start
        self.texts = texts
        self.tokens = usage.completion_tokens if usage is not None else len(texts)
        self.ttfts.append(first)
        return first, self.tokens / elapsed, float("nan")

    async def close(self) -> None:
        await self.client.close()


def ttft_spread(ours: HttpStream, peer: HttpStream) -> str:
    """The TTFT spread of both servers over the rounds, and their difference per round.

    Rounds interleave the contenders, so a burst of load on the machine hits both in
    the same round: the per-round difference is steadier than either median. The
    warm-up round is left out, as in the table.
    """
    a, b = ours.ttfts[1:], peer.ttfts[1:]
    diffs = sorted((x - y) * 1e3 for x, y in zip(a, b, strict=True))

    def span(values: list[float]) -> str:
        ms = sorted(v * 1e3 for v in values)
        return f"{ms[0]:.2f}-{ms[-1]:.2f} ms"

    return (
        f"HTTP TTFT over {len(a)} rounds: Kensho {span(a)}, llama_cpp.server {span(b)}; "
        f"Kensho minus llama_cpp.server per round: median {statistics.median(diffs):+.2f} ms, "
        f"range {diffs[0]:+.2f} to {diffs[-1]:+.2f} ms"
    )
