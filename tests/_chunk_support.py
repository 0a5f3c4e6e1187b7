"""Reading engine streams in tests: whole, as text, and by token whatever their chunking.

A chunk is one token while its consumer keeps up and several when the consumer fell
behind (``GenerationChunk.tokens``), which a test on a loaded machine cannot control.
Tests about tokens (their indices, a continuation after the first n) read them here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from kensho.runtime.engines import Engine, GenerationChunk, GenerationRequest

__all__ = [
    "cancel_after_first",
    "collect",
    "head_tokens",
    "leave_after",
    "loaded",
    "text_of",
    "token_indices",
    "tokens_of",
]

E = TypeVar("E", bound=Engine)


@asynccontextmanager
async def loaded(engine: E) -> AsyncIterator[E]:
    """``engine`` loaded for the block, closed after it (a module fixture's body)."""
    await engine.load()
    try:
        yield engine
    finally:
        await engine.close()


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationChunk]:
    """Every chunk of one request."""
    return [chunk async for chunk in engine.generate(request)]


def text_of(chunks: Sequence[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def tokens_of(chunks: Sequence[GenerationChunk]) -> int:
    """How many tokens the chunks stand for."""
    return sum(c.tokens for c in chunks)


def token_indices(chunks: Sequence[GenerationChunk]) -> list[int]:
    """The index of every token the chunks stand for, in stream order."""
    return [i for c in chunks for i in range(c.index - c.tokens + 1, c.index + 1)]


def head_tokens(chunks: Sequence[GenerationChunk], n: int) -> list[GenerationChunk]:
    """The first chunks that hold at least ``n`` tokens (a whole chunk, never a part)."""
    head: list[GenerationChunk] = []
    for chunk in chunks:
        if tokens_of(head) >= n:
            break
        head.append(chunk)
    return head


async def leave_after(engine: Engine, request: GenerationRequest, tokens: int) -> int:
    """Read ``request``'s stream until ``tokens`` came, then close it; how many came."""
    stream = engine.generate(request)
    received = 0
    async for chunk in stream:
        received += chunk.tokens
        if received >= tokens:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    return received


async def cancel_after_first(engine: Engine, request: GenerationRequest) -> None:
    """Cancel the task reading ``request``'s stream once its first chunk came."""
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    raise AssertionError("the consumer finished before it could be cancelled")
