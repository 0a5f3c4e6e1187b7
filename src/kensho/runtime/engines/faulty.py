"""Fault-injecting engines: the roadmap's MockGPUEngine / MockCPUEngine, for tests and demos.

They stream deterministic text at a configurable pace on the injected clock, and fail
on command, so every path of the runtime (failover before the first token, mid-stream
continuation, hung engines, slow engines, flaky engines, engines that never load) can
be exercised without a GPU and without waiting. They ship in the package, not in the
tests, because users need them too: to test their own application's reaction to a
dying GPU, and for ``kensho`` demos.

Failure modes (combine freely; :meth:`FaultyEngine.heal` clears them all)::

    engine.force_failure()                     # every call fails before its first token
    engine.force_failure(times=2)              # the next 2 calls fail, then healthy again
    engine.force_failure(after_tokens=5)       # fail mid-stream, after 5 tokens
    engine.hang(after_tokens=0)                # never produce the first token
    engine.slow_down(10)                       # 10x slower time to first token and per token
    engine.set_failure_probability(0.2)        # each call fails with p=0.2 (seeded RNG)
    engine.fail_load()                         # load() raises EngineUnavailableError

Text is a pure function of (prompt, seed, token position), so the CPU preset continues
a stream exactly where the GPU preset stopped: tests can check that a failed-over
stream is the stream the user would have got.

They declare no :data:`~kensho.runtime.engines.base.FEATURES` (their "tokens" are
vocabulary words, not a model's distribution): the server refuses logprobs,
penalties, logit bias and embeddings when they serve, and the engines refuse such a
request too if one reaches them.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kensho.errors import EngineError, EngineUnavailableError, InvalidRequestError
from kensho.runtime.clock import AsyncioClock, Clock
from kensho.runtime.engines.base import (
    EngineKind,
    Feature,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
)
from kensho.telemetry import get_logger

__all__ = ["EngineStats", "FaultyEngine", "MockCPUEngine", "MockGPUEngine"]

log = get_logger("runtime.engine")

_VOCABULARY = (
    "the", "model", "runs", "offline", "on", "a", "local", "device", "and", "answers",
    "quickly", "with", "care", "every", "token", "counts", "when", "power", "fails",
    "kensho", "keeps", "going", "steady", "bright",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters of a fault-injecting engine (for assertions in tests)."""

    calls: int
    completed: int
    failures: int
    hangs: int
    tokens: int
    active: int
    peak_active: int


@dataclass(slots=True)
class _Fault:
    mode: str  # "fail" or "hang"
    after_tokens: int
    times: int | None
    error: EngineError | None


class FaultyEngine:
    """An engine that streams deterministic tokens and fails on command (see module doc)."""

    features: frozenset[Feature] = frozenset()

    def __init__(
        self,
        name: str = "mock",
        kind: EngineKind = "other",
        *,
        clock: Clock | None = None,
        time_to_first_token: float = 0.0,
        time_per_token: float = 0.0,
        seed: int = 0,
        supports_continuation: bool = True,
    ) -> None:
        if time_to_first_token < 0 or time_per_token < 0:
            raise ValueError("latencies must be >= 0 s")
        self.name = name
        self.kind: EngineKind = kind
        self.supports_continuation = supports_continuation
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self.time_to_first_token = time_to_first_token
        self.time_per_token = time_per_token
        self.loaded = False
        self._rng = random.Random(seed)  # noqa: S311 - reproducible fault injection, not crypto
        self._faults: list[_Fault] = []
        self._failure_probability = 0.0
        self._probability_after = 0
        self._slow_factor = 1.0
        self._fail_load = False
        self._fail_load_permanent = False
        self._calls = self._completed = self._failures = self._hangs = self._tokens = 0
        self._active = self._peak = 0

    # -- fault control ---------------------------------------------------------------

    def force_failure(
        self,
        on: bool = True,
        *,
        times: int | None = None,
        after_tokens: int = 0,
        error: EngineError | None = None,
    ) -> None:
        """Make calls fail: all of them (``times=None``) or the next ``times``.

        ``after_tokens=0`` fails before the first token, ``k`` after ``k`` tokens.
        ``on=False`` removes every forced failure. ``error`` replaces the default
        :class:`EngineError` (e.g. an ``EngineOutOfMemoryError``).
        """
        self._set_fault("fail", on, times, after_tokens, error)

    def hang(self, on: bool = True, *, times: int | None = None, after_tokens: int = 0) -> None:
        """Make calls stop producing tokens forever (until cancelled) after ``after_tokens``."""
        self._set_fault("hang", on, times, after_tokens, None)

    def _set_fault(
        self,
        mode: str,
        on: bool,
        times: int | None,
        after_tokens: int,
        error: EngineError | None,
    ) -> None:
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        if after_tokens < 0:
            raise ValueError(f"after_tokens must be >= 0, got {after_tokens}")
        self._faults = [f for f in self._faults if f.mode != mode]
        if on:
            self._faults.append(_Fault(mode, after_tokens, times, error))

    def slow_down(self, factor: float = 1.0) -> None:
        """Multiply both latencies by ``factor`` (1.0 restores the configured pace)."""
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self._slow_factor = factor

    def set_failure_probability(self, p: float, *, after_tokens: int = 0) -> None:
        """Fail each call with probability ``p``, drawn from the engine's seeded RNG."""
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self._failure_probability = p
        self._probability_after = after_tokens

    def fail_load(self, on: bool = True, *, permanent: bool = False) -> None:
        """Make :meth:`load` raise :class:`EngineUnavailableError` (no device, no weights).

        ``permanent`` marks it as a device that does not exist (like no CUDA at all).
        """
        self._fail_load = on
        self._fail_load_permanent = permanent

    def heal(self) -> None:
        """Clear every injected fault and slowdown."""
        self._faults.clear()
        self._failure_probability = 0.0
        self._slow_factor = 1.0
        self._fail_load = False

    @property
    def faulty(self) -> bool:
        """Whether some failure mode is currently armed."""
        return bool(self._faults) or self._failure_probability > 0 or self._fail_load

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""
        return EngineStats(
            calls=self._calls,
            completed=self._completed,
            failures=self._failures,
            hangs=self._hangs,
            tokens=self._tokens,
            active=self._active,
            peak_active=self._peak,
        )

    # -- Engine protocol --------------------------------------------------------------

    async def load(self) -> None:
        """Become ready, or raise :class:`EngineUnavailableError` when told to."""
        if self._fail_load:
            raise EngineUnavailableError(
                f"engine {self.name!r} ({self.kind}) cannot load: injected failure",
                permanent=self._fail_load_permanent,
            )
        self.loaded = True

    async def close(self) -> None:
        """Forget the loaded state."""
        self.loaded = False

    async def health(self) -> bool:
        """Loaded and with no failure mode armed."""
        return self.loaded and not self.faulty

    def _pick_fault(self) -> _Fault | None:
        for fault in self._faults:
            if fault.times is not None:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
            return fault
        if self._failure_probability > 0 and self._rng.random() < self._failure_probability:
            return _Fault("fail", self._probability_after, None, None)
        return None

    def _token(self, request: GenerationRequest, position: int) -> str:
        key = f"{request.seed}|{request.text_input}|{position}".encode()
        return _VOCABULARY[zlib.crc32(key) % len(_VOCABULARY)] + " "

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream ``max_tokens`` deterministic tokens, honouring injected faults."""
        if not self.loaded:
            raise EngineUnavailableError(
                f"engine {self.name!r} is not loaded; call load() before generate()"
            )
        if request.constrained:  # it cannot: refuse, never answer in free text
            raise InvalidRequestError(
                f"engine {self.name!r} cannot constrain decoding (response_format, tools)",
                param="tools" if request.tools else "response_format",
            )
        if request.needs:
            raise InvalidRequestError(
                f"engine {self.name!r} cannot honour {', '.join(sorted(request.needs))}",
                code="unsupported_parameter",
            )
        self._calls += 1
        fault = self._pick_fault()
        start = len(request.continuation.split())
        text = request.continuation
        prompt_tokens = len(request.text_input.split())  # its "tokens" are words
        self._active += 1
        self._peak = max(self._peak, self._active)
        try:
            for i in range(request.max_tokens):
                if fault is not None and i == fault.after_tokens:
                    await self._trigger(fault, request, i)
                delay = self.time_to_first_token if i == 0 else self.time_per_token
                if delay > 0:
                    await self.clock.sleep(delay * self._slow_factor)
                token = self._token(request, start + i)
                text += token
                self._tokens += 1
                stopped = any(s in text for s in request.stop) if request.stop else False
                last = stopped or i == request.max_tokens - 1
                finish: FinishReason | None = None
                if last:
                    finish = "stop" if stopped else "length"
                yield GenerationChunk(
                    text=token,
                    index=start + i,
                    engine=self.name,
                    finish_reason=finish,
                    prompt_tokens=prompt_tokens if i == 0 else None,
                )
                if stopped:
                    break
            self._completed += 1
        finally:
            self._active -= 1

    async def _trigger(self, fault: _Fault, request: GenerationRequest, produced: int) -> None:
        if fault.mode == "hang":
            self._hangs += 1
            log.debug("injected hang", engine=self.name, request_id=request.request_id)
            await asyncio.get_running_loop().create_future()  # never resolves; cancellable
        self._failures += 1
        if fault.error is not None:
            raise fault.error
        where = "before the first token" if produced == 0 else f"after {produced} tokens"
        raise EngineError(
            f"engine {self.name!r} ({self.kind}) failed {where} of request "
            f"{request.request_id} (injected failure)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r})"


class MockGPUEngine(FaultyEngine):
    """The fast preset: 50 ms to the first token, 10 ms per token."""

    def __init__(
        self,
        name: str = "gpu",
        *,
        clock: Clock | None = None,
        time_to_first_token: float = 0.05,
        time_per_token: float = 0.01,
        seed: int = 0,
        supports_continuation: bool = True,
    ) -> None:
        super().__init__(
            name,
            "gpu",
            clock=clock,
            time_to_first_token=time_to_first_token,
            time_per_token=time_per_token,
            seed=seed,
            supports_continuation=supports_continuation,
        )


class MockCPUEngine(FaultyEngine):
    """The slow, reliable preset: five times slower than :class:`MockGPUEngine`."""

    def __init__(
        self,
        name: str = "cpu",
        *,
        clock: Clock | None = None,
        time_to_first_token: float = 0.25,
        time_per_token: float = 0.05,
        seed: int = 0,
        supports_continuation: bool = True,
    ) -> None:
        super().__init__(
            name,
            "cpu",
            clock=clock,
            time_to_first_token=time_to_first_token,
            time_per_token=time_per_token,
            seed=seed,
            supports_continuation=supports_continuation,
        )
