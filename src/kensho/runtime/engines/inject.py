"""FaultInjector: make any real engine fail on command.

The fault-injecting engines in :mod:`~kensho.runtime.engines.faulty` invent their own
text. To show that a failover loses nothing with a *real* model — the user receives
exactly the text the fallback alone would have produced — the primary must produce
the real model's tokens and then die. This wrapper does that: it forwards to an inner
engine (say a :class:`~kensho.runtime.engines.torch_engine.TorchEngine`) under its own
name and kind, and raises :class:`~kensho.errors.EngineError` before the first token or
after ``k`` tokens when told to. Also useful in demos: kill "the GPU" mid-answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing

from kensho.errors import EngineError
from kensho.runtime.engines.base import (
    Engine,
    EngineKind,
    GenerationChunk,
    GenerationRequest,
    features_of,
)

__all__ = ["FaultInjector"]


class FaultInjector:
    """Wraps ``inner``; ``force_failure(after_tokens=k, times=n)`` arms a fault."""

    def __init__(self, inner: Engine, *, name: str | None = None, kind: EngineKind | None = None):
        self.inner = inner
        self.name = name or inner.name
        self.kind: EngineKind = kind or inner.kind
        self.supports_continuation = inner.supports_continuation
        self.features = features_of(inner)
        self._after: int | None = None
        self._times: int | None = None
        self.failures = 0

    def force_failure(
        self, on: bool = True, *, after_tokens: int = 0, times: int | None = None
    ) -> None:
        """Fail the next ``times`` calls (forever when ``None``) after ``after_tokens``."""
        self._after = after_tokens if on else None
        self._times = times if on else None

    async def load(self) -> None:
        await self.inner.load()

    async def close(self) -> None:
        await self.inner.close()

    async def health(self) -> bool:
        """The inner engine's health, unless a fault is armed."""
        if self._after is not None:
            return False
        probe = getattr(self.inner, "health", None)
        return bool(await probe()) if probe is not None else True

    def _armed(self) -> int | None:
        if self._after is None:
            return None
        if self._times is not None:
            if self._times <= 0:
                self._after = None
                return None
            self._times -= 1
        return self._after

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        after = self._armed()
        produced = 0
        async with aclosing(self.inner.generate(request)) as chunks:  # type: ignore[type-var]
            if after == 0:
                self.failures += 1
                raise EngineError(f"engine {self.name!r} failed before the first token (injected)")
            async for chunk in chunks:
                yield dataclasses.replace(chunk, engine=self.name)  # logprobs, usage kept
                produced += chunk.tokens
                if after is not None and produced >= after and chunk.finish_reason is None:
                    self.failures += 1
                    raise EngineError(
                        f"engine {self.name!r} failed after {produced} tokens (injected)"
                    )
