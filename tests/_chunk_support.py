"""Reading streams by token, whatever their chunking.

A chunk is one token while its consumer keeps up and several when the consumer fell
behind (``GenerationChunk.tokens``), which a test on a loaded machine cannot control.
Tests about tokens (their indices, a continuation after the first n) read them here.
"""

from __future__ import annotations

from collections.abc import Sequence

from kensho.runtime.engines import GenerationChunk

__all__ = ["head_tokens", "token_indices", "tokens_of"]


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
