"""RuntimeManager: serve requests on the primary engine, fall back, come back by itself.

The primary (GPU) and the fallback (CPU) each sit behind their *own* circuit breaker.
That is the fix for the original's worst bug: there, CPU failures were counted against
the GPU breaker, so a struggling CPU kept the GPU "broken" and vice versa.

Routing of one request:

1. While the primary's breaker admits it, the request goes to the primary.
2. If the primary fails (or stays silent past ``first_token_timeout``) before the first
   token, the failure is recorded and the *same* request is served by the fallback:
   the user sees tokens, never the error.
3. If it fails mid-stream, the stream continues on the fallback from the text already
   produced (``GenerationRequest.continued``) when the fallback supports continuation;
   otherwise the stream ends with an :class:`EngineError` that says so.
4. If neither engine can serve, :class:`CircuitOpenError` (both breakers refuse) or
   :class:`EngineError` (the fallback failed too) says what happened and when to retry.

Users are told what happens, loudly (Ollama switches to CPU silently): every breaker
transition reaches the event hub as it is (the breakers publish on it directly), and
becomes a status event with a readable message — "GPU failing, switched to CPU
(degraded performance)", "testing GPU", "GPU restored" — on :meth:`events`, on
listeners, and in the log (the hub's log listener writes it). The message is the state users are in,
whatever order the breakers moved in: once neither engine admits requests it is "no
engine available", even when the fallback's breaker opened first, and the end of that
is announced too ("CPU recovered ... serving on CPU", or "GPU restored").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType

from kensho.config import RuntimeSettings
from kensho.errors import CircuitOpenError, EngineError, EngineUnavailableError
from kensho.events import (
    BreakerStateChanged,
    Event,
    FallbackActivated,
    PrimaryProbeFailed,
    PrimaryProbing,
    PrimaryRestored,
    RequestRerouted,
    RuntimeAvailable,
    RuntimeUnavailable,
)
from kensho.hub import EventHub, Listener
from kensho.runtime.breaker import (
    FORCED_OPEN_RETRY_AFTER,
    BreakerMetrics,
    BreakerState,
    CircuitBreaker,
    Permit,
)
from kensho.runtime.clock import AsyncioClock, Clock, timeout
from kensho.runtime.engines.base import Engine, GenerationChunk, GenerationRequest
from kensho.telemetry import get_logger, start_span

__all__ = ["RuntimeManager", "RuntimeMetrics"]

log = get_logger("runtime.manager")

_DOWN = (BreakerState.OPEN, BreakerState.FORCED_OPEN)
_UP = (BreakerState.CLOSED, BreakerState.DISABLED)


@dataclass(frozen=True, slots=True)
class RuntimeMetrics:
    """A snapshot of routing counters and both breakers."""

    active_engine: str
    degraded: bool
    requests: int
    served_by_primary: int
    served_by_fallback: int
    rerouted: int
    continued_mid_stream: int
    failed: int
    rejected: int
    primary: BreakerMetrics
    fallback: BreakerMetrics | None


def _is_bad_request(exc: BaseException) -> bool:
    """Invalid input says nothing about an engine's health: never count or reroute it."""
    return isinstance(exc, ValueError | TypeError)


class RuntimeManager:
    """Primary/fallback routing through two independent circuit breakers.

    ``first_token_timeout`` and ``chunk_timeout`` turn a hung engine into a failure
    (``None`` disables them); during a half-open probe both are further bounded by the
    breaker's ``half_open_timeout`` — the probe must show signs of life quickly, but a
    healthy long generation is not cut off.

    ``hub`` is where status events go (the kernel passes the service's one hub); by
    default the manager makes its own.
    """

    def __init__(
        self,
        primary: Engine,
        fallback: Engine | None = None,
        *,
        clock: Clock | None = None,
        primary_breaker: CircuitBreaker | None = None,
        fallback_breaker: CircuitBreaker | None = None,
        first_token_timeout: float | None = 30.0,
        chunk_timeout: float | None = 30.0,
        hub: EventHub | None = None,
    ) -> None:
        if fallback is not None and fallback is primary:
            raise ValueError("the fallback engine must be a different engine")
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self.primary = primary
        self.fallback = fallback
        self.primary_breaker = primary_breaker or CircuitBreaker(
            primary.name, clock=self.clock, exclude_if=_is_bad_request
        )
        self.fallback_breaker: CircuitBreaker | None = None
        if fallback is not None:
            self.fallback_breaker = fallback_breaker or CircuitBreaker(
                fallback.name, clock=self.clock, exclude_if=_is_bad_request
            )
        self.first_token_timeout = first_token_timeout
        self.chunk_timeout = chunk_timeout
        self._hub = hub if hub is not None else EventHub()
        self._labels = self._make_labels()
        self._primary_ready = False
        self._fallback_ready = False
        self._primary_missing = False  # the primary's device does not exist here
        self._forced_failures: int | None = 0  # None: forced until turned off
        self._unavailable_since: float | None = None  # when "no engine available" began
        self._requests = self._by_primary = self._by_fallback = 0
        self._rerouted = self._continued = self._failed = self._rejected = 0
        # The raw transition reaches the hub first (the executor re-plans on it), then
        # the manager turns it into what users are told.
        self.primary_breaker.add_listener(self._hub.emit)
        self.primary_breaker.add_listener(self._on_primary_transition)
        if self.fallback_breaker is not None:
            self.fallback_breaker.add_listener(self._hub.emit)
            self.fallback_breaker.add_listener(self._on_fallback_transition)

    @classmethod
    def from_settings(
        cls,
        primary: Engine,
        fallback: Engine | None,
        settings: RuntimeSettings,
        *,
        clock: Clock | None = None,
        hub: EventHub | None = None,
    ) -> RuntimeManager:
        """Build a manager and its two breakers from the ``[runtime]`` settings."""
        clock = clock if clock is not None else AsyncioClock()

        def breaker(engine: Engine) -> CircuitBreaker:
            return CircuitBreaker(
                engine.name,
                clock=clock,
                failure_threshold=settings.failure_threshold,
                success_threshold=settings.success_threshold,
                open_duration=settings.open_duration,
                open_duration_multiplier=settings.open_duration_multiplier,
                max_open_duration=settings.max_open_duration,
                half_open_max_calls=settings.half_open_max_calls,
                half_open_timeout=settings.half_open_timeout,
                failure_rate_threshold=settings.failure_rate_threshold,
                slow_call_threshold=settings.slow_call_threshold,
                exclude_if=_is_bad_request,
            )

        return cls(
            primary,
            fallback,
            clock=clock,
            primary_breaker=breaker(primary),
            fallback_breaker=breaker(fallback) if fallback is not None else None,
            first_token_timeout=settings.first_token_timeout,
            chunk_timeout=settings.chunk_timeout,
            hub=hub,
        )

    def _make_labels(self) -> tuple[str, str]:
        """Human names for messages: "GPU"/"CPU" when the kinds tell them apart."""
        p, f = self.primary, self.fallback
        if f is not None and p.kind != f.kind and {p.kind, f.kind} <= {"gpu", "cpu", "remote"}:
            return p.kind.upper(), f.kind.upper()
        return p.name, f.name if f is not None else "none"

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load both engines. A primary that cannot load means starting on the fallback
        (announced); only when no engine loads does this raise EngineUnavailableError.
        """
        primary_label, fallback_label = self._labels
        problems: list[str] = []
        # Both load at once: a child-process engine spends seconds importing its
        # framework, and the two need not wait for each other. What each load meant is
        # then said in order, the primary's first.
        engines = [self.primary] if self.fallback is None else [self.primary, self.fallback]
        loads = [asyncio.ensure_future(_load(engine)) for engine in engines]
        try:
            outcomes = await asyncio.gather(*loads)
        except BaseException:  # cancelled, or a fault that is no EngineError: stop both
            for load in loads:
                load.cancel()
            await asyncio.gather(*loads, return_exceptions=True)
            raise
        if (exc := outcomes[0]) is None:
            self._primary_ready = True
        else:
            problems.append(f"{primary_label}: {exc}")
            log.warning("primary engine unavailable at start", engine=self.primary.name)
            if isinstance(exc, EngineUnavailableError) and exc.permanent:
                # No device at all: probing it every open period would only fail, loudly.
                # Say it once; an operator's reset (admin API) tries it again.
                self._primary_missing = True
                self.primary_breaker.force_open(f"{primary_label} unavailable: {exc}")
            else:
                self.primary_breaker.trip(f"{primary_label} unavailable at start: {exc}")
        if len(outcomes) == 2 and self.fallback_breaker is not None:
            if (failure := outcomes[1]) is None:
                self._fallback_ready = True
            else:
                problems.append(f"{fallback_label}: {failure}")
                self.fallback_breaker.trip(f"{fallback_label} unavailable at start: {failure}")
        if not self._primary_ready and not self._fallback_ready:
            raise EngineUnavailableError(
                "no inference engine could start (" + "; ".join(problems) + "); "
                "check the device drivers and model files, then retry"
            )
        log.info(
            "runtime started",
            primary=self.primary.name,
            fallback=self.fallback.name if self.fallback else None,
            degraded=self.degraded,
        )

    async def close(self) -> None:
        """Close both engines and stop the breakers' timers (no event after shutdown)."""
        self.primary_breaker.close()
        if self.fallback_breaker is not None:
            self.fallback_breaker.close()
        await self.primary.close()
        if self.fallback is not None:
            await self.fallback.close()
        self._primary_ready = self._fallback_ready = False

    async def __aenter__(self) -> RuntimeManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- status -----------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True when new requests do not go to the primary as normal."""
        return not self.primary_breaker.is_closed

    @property
    def active_engine(self) -> Engine:
        """The engine new requests are routed to right now."""
        if self.fallback is None or self.primary_breaker.is_closed:
            return self.primary
        return self.fallback

    def retry_after(self) -> float:
        """Seconds until some engine should admit a request again (0 if one does now).

        The earliest engine decides: an open breaker's next probe, bounded by when the
        other engine admits again. A forced-open breaker has no probe due, so it does
        not count (a forced-open GPU and a CPU open for 45 s mean 45 s); with nothing
        scheduled at all it is :data:`~kensho.runtime.breaker.FORCED_OPEN_RETRY_AFTER`.
        """
        breakers = [self.primary_breaker, self.fallback_breaker]
        delays = [d for b in breakers if b is not None and (d := b.admission_delay()) is not None]
        return min(delays) if delays else FORCED_OPEN_RETRY_AFTER

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` synchronously for every status event."""
        self._hub.add_listener(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        self._hub.remove_listener(listener)

    def events(self, *, buffer: int = 256, replay: bool = False) -> AsyncIterator[Event]:
        """The status stream: ``async for event in runtime.events(): print(event.message)``."""
        return self._hub.stream(buffer=buffer, replay=replay)

    @property
    def hub(self) -> EventHub:
        """The hub status events go through: breaker transitions and what they mean
        (the executor subscribes to it and publishes on it too)."""
        return self._hub

    def metrics(self) -> RuntimeMetrics:
        """Routing counters and both breakers' snapshots."""
        fb = self.fallback_breaker
        return RuntimeMetrics(
            active_engine=self.active_engine.name,
            degraded=self.degraded,
            requests=self._requests,
            served_by_primary=self._by_primary,
            served_by_fallback=self._by_fallback,
            rerouted=self._rerouted,
            continued_mid_stream=self._continued,
            failed=self._failed,
            rejected=self._rejected,
            primary=self.primary_breaker.metrics(),
            fallback=fb.metrics() if fb is not None else None,
        )

    def force_primary_failure(self, on: bool = True, *, times: int | None = None) -> None:
        """Make the primary fail (before its first token) for tests and demos.

        ``times=n`` fails the next ``n`` primary calls; ``on=False`` stops. The
        failures go through the primary's breaker exactly like real ones.
        """
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        self._forced_failures = (times if times is not None else None) if on else 0
        log.info("forced primary failure", on=on, times=times)

    # -- breaker transitions -> user-facing events ---------------------------------------

    def _on_primary_transition(self, event: Event) -> None:
        assert isinstance(event, BreakerStateChanged)
        self._announce(self._primary_status(event))

    def _on_fallback_transition(self, event: Event) -> None:
        assert isinstance(event, BreakerStateChanged)
        self._announce(self._fallback_status(event))

    def _fallback_down(self) -> bool:
        """True when no fallback would take a request (none, or its breaker refuses)."""
        breaker = self.fallback_breaker
        return breaker is None or breaker.state in _DOWN

    def _primary_status(self, event: BreakerStateChanged) -> Event | None:
        """The user-facing event for a primary transition, given the fallback's state."""
        primary, fallback = self._labels
        to, previous = event.to_state, event.from_state
        if to in _DOWN:
            if self._fallback_down():
                return self._unavailable(
                    f"{primary} failing and no fallback engine is configured"
                    if self.fallback is None
                    else f"{primary} and {fallback} both failing ({event.reason})"
                )
            if previous == BreakerState.HALF_OPEN:
                return PrimaryProbeFailed(
                    primary=primary, fallback=fallback, reason=event.reason, retry_in=event.open_for
                )
            return FallbackActivated(
                primary=primary,
                fallback=fallback,
                reason=event.reason,
                retry_in=event.open_for,
                permanent=self._primary_missing and to == BreakerState.FORCED_OPEN,
            )
        if to == BreakerState.HALF_OPEN:
            return PrimaryProbing(primary=primary)
        if to in _UP and previous not in _UP:
            self._unavailable_since = None
            return PrimaryRestored(primary=primary)
        return None

    def _fallback_status(self, event: BreakerStateChanged) -> Event | None:
        """The user-facing event for a fallback transition (only matters while degraded)."""
        if not self.degraded:
            return None  # the primary serves: the fallback's trouble changes nothing yet
        primary, fallback = self._labels
        if event.to_state in _DOWN:
            return self._unavailable(f"{primary} and {fallback} both failing ({event.reason})")
        since = self._unavailable_since
        if event.to_state in _UP and since is not None:
            self._unavailable_since = None
            return RuntimeAvailable(
                engine=fallback, degraded=True, unavailable_for=self.clock.monotonic() - since
            )
        return None

    def _unavailable(self, reason: str) -> RuntimeUnavailable:
        if self._unavailable_since is None:
            self._unavailable_since = self.clock.monotonic()
        return RuntimeUnavailable(reason=reason, retry_after=self.retry_after())

    def _announce(self, status: Event | None) -> None:
        """Publish what users are told (the hub's log listener writes it down)."""
        if status is not None:
            self._hub.emit(status)

    # -- serving ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream ``request`` from the best available engine (see the module doc).

        Closing the iterator early (``break``, ``aclose()``, cancellation) cancels the
        engine call and releases its breaker permit without counting it either way.
        """
        self._requests += 1
        produced_text = ""
        produced = 0
        primary_error: Exception | None = None
        primary_refusal: CircuitOpenError | None = None
        try:
            permit = self.primary_breaker.acquire()
        except CircuitOpenError as exc:
            permit = None
            primary_refusal = exc
        if permit is not None:
            started = self.clock.monotonic()
            first_token: float | None = None
            try:
                async with aclosing(self._engine_stream(self.primary, request, permit)) as chunks:
                    async for chunk in chunks:
                        if first_token is None:
                            first_token = self.clock.monotonic() - started
                        produced += chunk.tokens
                        produced_text += chunk.text
                        yield chunk
            except Exception as exc:
                permit.failure(exc)
                if _is_bad_request(exc) or self.fallback is None:
                    self._failed += 1
                    raise
                primary_error = exc
            except BaseException:
                permit.release()
                raise
            else:
                permit.success(elapsed=first_token)  # slow = slow to answer, not long
                self._by_primary += 1
                return
        fallback = self._serve_fallback(
            request, produced_text, produced, primary_error, primary_refusal
        )
        async with aclosing(fallback):  # an early stop releases the fallback now, not at GC
            async for chunk in fallback:
                yield chunk

    async def _serve_fallback(
        self,
        request: GenerationRequest,
        produced_text: str,
        produced: int,
        primary_error: Exception | None,
        primary_refusal: CircuitOpenError | None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        primary_label, fallback_label = self._labels
        fallback, breaker = self.fallback, self.fallback_breaker
        if fallback is None or breaker is None:
            self._rejected += 1
            assert primary_refusal is not None
            retry = primary_refusal.retry_after
            raise CircuitOpenError(
                f"request {request.request_id} refused: {primary_label} is unavailable "
                f"and no fallback engine is configured; {self._retry_hint(retry)}",
                retry_after=retry,
            ) from primary_refusal
        if produced:
            if produced >= request.max_tokens:  # failed after the last token: nothing lost
                self._by_primary += 1
                return
            if not fallback.supports_continuation:
                self._failed += 1
                raise EngineError(
                    f"request {request.request_id}: {primary_label} failed after {produced} "
                    f"tokens ({primary_error}) and {fallback_label} cannot continue a "
                    "stream; send the request again"
                ) from primary_error
            request = request.continued(produced_text, produced)
        try:
            permit = breaker.acquire()
        except CircuitOpenError as exc:
            self._rejected += 1
            retry = self.retry_after()
            why = (
                f"{primary_label} failed ({primary_error})"
                if primary_error
                else (f"{primary_label} is {self.primary_breaker.state.value.replace('_', '-')}")
            )
            raise CircuitOpenError(
                f"request {request.request_id} refused: {why} and {fallback_label} "
                f"(fallback) is refusing calls too; {self._retry_hint(retry)}",
                retry_after=retry,
            ) from (primary_error or exc)
        if primary_error is not None:
            self._rerouted += 1
            if produced:
                self._continued += 1
            note = RequestRerouted(
                request_id=request.request_id,
                from_engine=primary_label,
                to_engine=fallback_label,
                reason=str(primary_error) or type(primary_error).__name__,
                tokens_done=produced,
            )
            self._hub.emit(note)
            start_span(
                "kensho.failover",
                **{
                    "kensho.request_id": request.request_id,
                    "kensho.failover.from": self.primary.name,
                    "kensho.failover.to": fallback.name,
                    "kensho.failover.reason": note.reason,
                    "kensho.failover.tokens_done": produced,
                },
            ).end()
        try:
            started = self.clock.monotonic()
            first_token: float | None = None
            async with aclosing(self._engine_stream(fallback, request, permit)) as chunks:
                async for chunk in chunks:
                    if first_token is None:
                        first_token = self.clock.monotonic() - started
                    yield chunk
        except Exception as exc:
            permit.failure(exc)
            self._failed += 1
            if _is_bad_request(exc):
                raise
            retry = self.retry_after()
            before = f"{primary_label} failed ({primary_error}), then " if primary_error else ""
            raise EngineError(
                f"request {request.request_id} failed: {before}{fallback_label} (fallback) "
                f"failed too ({exc}); retry in {max(retry, 1.0):.1f} s"
            ) from exc
        except BaseException:
            permit.release()
            raise
        permit.success(elapsed=first_token)
        self._by_fallback += 1

    def _retry_hint(self, retry: float) -> str:
        """ "retry in N s", and what to do when no breaker will ever reopen by itself."""
        breakers = (self.primary_breaker, self.fallback_breaker)
        if all(b is None or b.admission_delay() is None for b in breakers):
            return (
                "every engine is forced open and none will be tested until an operator "
                f"resets one (admin API); retry in {retry:.1f} s"
            )
        return f"retry in {retry:.1f} s"

    async def _engine_stream(
        self, engine: Engine, request: GenerationRequest, permit: Permit
    ) -> AsyncGenerator[GenerationChunk, None]:
        """One engine's stream with hang detection (and forced failures on the primary),
        traced as one ``kensho.engine`` span per attempt."""
        is_primary = engine is self.primary
        attempt = start_span(
            f"kensho.engine {engine.name}",
            **{
                "kensho.engine": engine.name,
                "kensho.role": "primary" if is_primary else "fallback",
                "kensho.request_id": request.request_id,
                "kensho.continuation_chars": len(request.continuation),
            },
        )
        tokens = 0
        try:
            attempt_chunks = self._attempt(engine, request, permit, is_primary=is_primary)
            async with aclosing(attempt_chunks) as chunks:  # stopped early: the engine now
                async for chunk in chunks:
                    tokens += chunk.tokens
                    yield chunk
        except Exception as exc:
            attempt.end(exc, **{"kensho.tokens": tokens})
            raise
        finally:  # also when the consumer stops early: not an error of the engine
            attempt.end(**{"kensho.tokens": tokens})

    async def _attempt(
        self, engine: Engine, request: GenerationRequest, permit: Permit, *, is_primary: bool
    ) -> AsyncGenerator[GenerationChunk, None]:
        if is_primary:
            forced = self._forced_failures
            if forced is None or forced > 0:
                if forced is not None:
                    self._forced_failures = forced - 1
                raise EngineError(
                    f"{self._labels[0]} failure forced by force_primary_failure() "
                    f"(request {request.request_id})"
                )
        probe_limit = permit.timeout
        if is_primary and not self._primary_ready:
            async with timeout(self.clock, probe_limit):
                await engine.load()
            self._primary_ready = True
        elif not is_primary and not self._fallback_ready:
            async with timeout(self.clock, probe_limit):
                await engine.load()
            self._fallback_ready = True
        first_limit = _min(self.first_token_timeout, probe_limit)
        next_limit = _min(self.chunk_timeout, probe_limit)
        limit, first = first_limit, True
        iterator = aiter(engine.generate(request))
        try:
            while True:
                try:
                    if limit is None:
                        chunk = await anext(iterator)
                    else:
                        async with timeout(self.clock, limit):
                            chunk = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    what = "first token" if first else "next token"
                    raise EngineError(
                        f"engine {engine.name!r} produced no {what} within {limit:g} s "
                        f"(request {request.request_id}); it is treated as hung"
                    ) from exc
                limit, first = next_limit, False
                yield chunk
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:  # stop the engine's work now, not at garbage collection
                await aclose()


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


async def _load(engine: Engine) -> EngineError | None:
    """Load ``engine``; its EngineError is returned to be reported, anything else raised."""
    try:
        await engine.load()
    except EngineError as exc:
        return exc
    return None
