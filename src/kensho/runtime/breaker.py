"""CircuitBreaker: stop calling an engine that keeps failing, probe it, resume by itself.

States::

    CLOSED ──(failures)──▶ OPEN ──(open_duration, timer)──▶ HALF_OPEN ──(successes)──▶ CLOSED
                             ▲                                  │
                             └──────────(any probe failure)─────┘
    FORCED_OPEN (manual: reject everything)    DISABLED (manual: admit everything, never trip)

Why our own and not pybreaker & co (see ANCHORS.md): those trip only on consecutive
failures, let every concurrent caller through in half-open, and pybreaker holds a lock
around the whole call. Here:

- it trips on ``failure_threshold`` consecutive failures *or* on a failure rate over a
  count- or time-based sliding window (after ``minimum_calls``; for a count window the
  minimum is clamped to the window size, as resilience4j does, so the rate can always
  be computed); the rate is compared exactly (55 failures of 100 reach a 0.55
  threshold, with no float rounding in the way); calls slower than
  ``slow_call_threshold`` count as failures; exceptions can be excluded by type or
  predicate (they count as neither success nor failure; a predicate that raises
  counts the call as a failure, so a broken predicate never holds a probe slot);
- HALF_OPEN admits at most ``half_open_max_calls`` concurrent probes, each bounded by
  ``half_open_timeout``; the rest are rejected at once with a retry-after;
- OPEN → HALF_OPEN is driven by a timer on the injected clock, so the change is
  announced (event + log) even when no request arrives, and the open period can grow
  on repeated trips (``open_duration_multiplier``) up to ``max_open_duration`` (24 h
  when unset), computed so that it never overflows however long the outage;
- no lock is ever held around a call: the state machine runs on the event loop
  thread between awaits, so it needs none, and a slow call never blocks another;
- an outcome is attributed to the state that admitted the call (a generation number):
  a slow request admitted while CLOSED that fails after the breaker already reopened
  does not count as a failed probe, nor extend the open period.

Two ways to call through it: ``await breaker.call(fn, *args)`` for plain coroutines,
and ``permit = breaker.acquire()`` then ``permit.success()`` / ``permit.failure(exc)``
/ ``permit.release()`` for work the breaker cannot wrap, like a token stream.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from fractions import Fraction
from typing import Literal, ParamSpec, TypeVar

from kensho.errors import CircuitOpenError
from kensho.events import BreakerStateChanged, Event
from kensho.runtime._breaker_rules import CountWindow, TimeWindow, check_settings
from kensho.runtime._breaker_types import BreakerMetrics, BreakerState, FailureInfo
from kensho.runtime.clock import AsyncioClock, Clock, TimerHandle, timeout
from kensho.telemetry import get_logger

__all__ = [
    "FORCED_OPEN_RETRY_AFTER",
    "BreakerMetrics",
    "BreakerState",
    "CircuitBreaker",
    "FailureInfo",
    "Permit",
]

P = ParamSpec("P")
T = TypeVar("T")

log = get_logger("runtime.breaker")

#: What a FORCED_OPEN breaker tells callers to wait. It schedules no probe: only
#: :meth:`CircuitBreaker.reset` ends it, at a moment nobody can predict. A made-up
#: cool-down (it used to be ``open_duration``) made clients that honour Retry-After
#: sleep a minute per retry; a short re-check makes them fail fast, and the refusal's
#: message says that an operator must reset the breaker.
FORCED_OPEN_RETRY_AFTER = 1.0

# Without max_open_duration the growing open period stops here: the engine is still
# probed daily, and no timer is set further out than any clock can hold.
_OPEN_DURATION_CEILING = 86_400.0


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN
_FORCED_OPEN = BreakerState.FORCED_OPEN
_DISABLED = BreakerState.DISABLED


class Permit:
    """Permission for one call; report its outcome exactly once (later reports are no-ops).

    ``probe`` is true when the call was admitted in HALF_OPEN; ``timeout`` is then the
    time the caller must bound it to (``half_open_timeout``), else ``None``.
    """

    __slots__ = ("_breaker", "_done", "_gen", "probe", "started")

    def __init__(self, breaker: CircuitBreaker, gen: int, probe: bool, started: float) -> None:
        self._breaker = breaker
        self._gen = gen
        self.probe = probe
        self.started = started
        self._done = False

    @property
    def done(self) -> bool:
        """Whether an outcome was already reported."""
        return self._done

    @property
    def timeout(self) -> float | None:
        """The bound on this call when it is a half-open probe."""
        return self._breaker.half_open_timeout if self.probe else None

    def success(self, elapsed: float | None = None) -> None:
        """The call succeeded (it may still count as a failure if it was too slow).

        ``elapsed`` is the duration to compare with ``slow_call_threshold`` (default:
        since the permit was granted). A stream passes its time to first token: a long
        answer is not a slow engine.
        """
        if not self._done:
            self._done = True
            self._breaker._on_success(self._gen, self.probe, self.started, elapsed)

    def failure(self, exc: BaseException) -> None:
        """The call failed with ``exc`` (excluded exceptions only release the permit)."""
        if not self._done:
            self._done = True
            self._breaker._on_exception(self._gen, self.probe, self.started, exc)

    def release(self) -> None:
        """The call ended with no verdict (cancelled by its caller): free the slot."""
        if not self._done:
            self._done = True
            self._breaker._on_release(self._gen, self.probe)


Listener = Callable[[Event], object]


class CircuitBreaker:
    """An asyncio-native circuit breaker on an injectable clock (see the module doc).

    Defaults follow the roadmap: 3 consecutive failures trip it, 2 probe successes
    close it, it stays open 60 s, a probe gets 5 s.

    With ``window_type="count"``, ``minimum_calls`` is clamped to ``window_size``
    (``window_size=5`` with the default minimum of 10 computes the rate over 5 calls);
    :attr:`minimum_calls` holds the value in force. Settings that cannot work
    (a threshold of 0, a fractional count window, a non-finite duration) raise
    ``ValueError`` naming the setting.
    """

    def __init__(
        self,
        name: str = "breaker",
        *,
        clock: Clock | None = None,
        failure_threshold: int = 3,
        success_threshold: int = 2,
        open_duration: float = 60.0,
        open_duration_multiplier: float = 1.0,
        max_open_duration: float | None = None,
        half_open_max_calls: int = 1,
        half_open_timeout: float | None = 5.0,
        failure_rate_threshold: float | None = None,
        window_type: Literal["count", "time"] = "count",
        window_size: float = 100,
        minimum_calls: int = 10,
        slow_call_threshold: float | None = None,
        exclude: Iterable[type[BaseException]] = (),
        exclude_if: Callable[[BaseException], bool] | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        check_settings(
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            open_duration=open_duration,
            open_duration_multiplier=open_duration_multiplier,
            max_open_duration=max_open_duration,
            failure_rate_threshold=failure_rate_threshold,
            window_type=window_type,
            window_size=window_size,
            minimum_calls=minimum_calls,
        )
        if window_type == "count":
            # resilience4j's rule for COUNT_BASED windows: a minimum larger than the
            # window could never be reached, and the rate would never be computed.
            minimum_calls = min(minimum_calls, int(window_size))
        self.name = name
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.open_duration = float(open_duration)
        self.open_duration_multiplier = float(open_duration_multiplier)
        self.max_open_duration = max_open_duration
        self.half_open_max_calls = half_open_max_calls
        self.half_open_timeout = half_open_timeout
        self.failure_rate_threshold = failure_rate_threshold
        # The threshold as the exact fraction the user wrote (0.55 is 11/20), so that
        # "failures / calls >= threshold" is decided in integers, never float products.
        rate = Fraction(repr(float(failure_rate_threshold or 1)))
        self._rate_num, self._rate_den = rate.numerator, rate.denominator
        self.minimum_calls = minimum_calls
        self.slow_call_threshold = slow_call_threshold
        self._exclude = tuple(exclude)
        self._exclude_if = exclude_if
        self._listeners: list[Listener] = list(listeners)
        self._window: CountWindow | TimeWindow | None = None
        if failure_rate_threshold is not None:
            self._window = (
                CountWindow(int(window_size))
                if window_type == "count"
                else TimeWindow(float(window_size))
            )
        # The success path reads the clock only when something needs durations or times.
        self._timed = slow_call_threshold is not None or window_type == "time"
        self._state = _CLOSED
        self._gen = 0
        self._state_since = self.clock.monotonic()
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._probes = 0
        self._trips = 0
        self._open_until: float | None = None
        self._open_reason = f"circuit {name!r} is open; retry in "
        self._timer: TimerHandle | None = None
        self._zero_counters()

    def _zero_counters(self) -> None:
        self._successes = 0
        self._failures = 0
        self._slow = 0
        self._timeouts = 0
        self._rejections = 0
        self._ignored = 0
        self._transitions = 0
        self._last_failure: FailureInfo | None = None

    # -- observation ------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state."""
        return self._state

    @property
    def is_closed(self) -> bool:
        """True in CLOSED and DISABLED: calls flow normally."""
        return self._state is _CLOSED or self._state is _DISABLED

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` on every state transition (on the loop thread)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def admission_delay(self) -> float | None:
        """Seconds until a call may be admitted (0 now); ``None`` when none is scheduled.

        OPEN: until the next probe is due. HALF_OPEN with every probe slot taken: at
        most ``half_open_timeout``, when a probe must have ended. FORCED_OPEN: ``None``,
        only :meth:`reset` ends it; a caller choosing between engines should then ask
        the other one (the runtime manager does).
        """
        state = self._state
        if state is _OPEN and self._open_until is not None:
            return max(0.0, self._open_until - self.clock.monotonic())
        if state is _HALF_OPEN and self._probes >= self.half_open_max_calls:
            return self.half_open_timeout if self.half_open_timeout is not None else 1.0
        if state is _FORCED_OPEN:
            return None
        return 0.0

    def retry_after(self) -> float:
        """Seconds until a call may be admitted again (0 when one would be now).

        :meth:`admission_delay`, with :data:`FORCED_OPEN_RETRY_AFTER` for a forced-open
        breaker, which has no probe due.
        """
        delay = self.admission_delay()
        return FORCED_OPEN_RETRY_AFTER if delay is None else delay

    def metrics(self) -> BreakerMetrics:
        """An immutable snapshot of counters, state and timing."""
        now = self.clock.monotonic()
        window = self._window
        rate: float | None = None
        calls = 0
        if window is not None:
            window.refresh(now)
            calls = window.calls
            if calls >= self.minimum_calls:
                rate = window.failures / calls
        return BreakerMetrics(
            name=self.name,
            state=self._state,
            successes=self._successes,
            failures=self._failures,
            slow_calls=self._slow,
            timeouts=self._timeouts,
            rejections=self._rejections,
            ignored=self._ignored,
            consecutive_failures=self._consecutive_failures,
            failure_rate=rate,
            window_calls=calls,
            transitions=self._transitions,
            trips=self._trips,
            time_in_state=now - self._state_since,
            open_until=self._open_until if self._state is _OPEN else None,
            probes_in_flight=self._probes,
            last_failure=self._last_failure,
        )

    # -- calling through ----------------------------------------------------------------

    def acquire(self) -> Permit:
        """Admit one call or raise :class:`CircuitOpenError` with a retry-after.

        The caller must report the outcome on the returned :class:`Permit`; a permit
        admitted in HALF_OPEN holds one of the ``half_open_max_calls`` probe slots
        until then.
        """
        state = self._state
        if state is _CLOSED or state is _DISABLED:
            return Permit(self, self._gen, False, self.clock.monotonic() if self._timed else 0.0)
        if state is _OPEN and self._open_until is not None:
            if self.clock.monotonic() >= self._open_until:  # the timer is late: catch up
                self._to_half_open(self._gen)
                return self.acquire()
        elif state is _HALF_OPEN and self._probes < self.half_open_max_calls:
            self._probes += 1
            return Permit(self, self._gen, True, self.clock.monotonic())
        raise self._rejection()

    def _rejection(self) -> CircuitOpenError:
        self._rejections += 1
        state = self._state
        if state is _OPEN and self._open_until is not None:
            # The hot case, kept lean: the text is built once per trip, not per call.
            retry = max(0.0, self._open_until - self.clock.monotonic())
            return CircuitOpenError(
                self._open_reason + format(retry, ".1f") + " s", retry_after=retry
            )
        retry = self.retry_after()
        if state is _FORCED_OPEN:
            why = (
                "was forced open by an operator and admits no call until it is reset "
                "(no probe is scheduled)"
            )
        else:
            why = (
                f"is testing recovery with {self._probes} probe call(s) "
                f"(at most {self.half_open_max_calls} at a time)"
            )
        return CircuitOpenError(
            f"circuit {self.name!r} {why}; retry in {retry:.1f} s", retry_after=retry
        )

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker and return its result.

        Raises :class:`CircuitOpenError` without calling ``fn`` when the breaker
        refuses; re-raises whatever ``fn`` raises after recording it. A half-open probe
        that runs past ``half_open_timeout`` is cancelled, counted as a failure (and a
        timeout) and surfaces as ``TimeoutError``.
        """
        state = self._state
        if state is not _CLOSED or self._timed:
            if state is _FORCED_OPEN or (
                state is _OPEN
                and self._open_until is not None
                and self.clock.monotonic() < self._open_until
            ):
                raise self._rejection()  # refused here: no coroutine for the slow path
            return await self._call_slow(fn, *args, **kwargs)
        # Fast path: CLOSED, no clock needed. Outcome bookkeeping is inlined.
        gen = self._gen
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self._on_exception(gen, False, 0.0, exc)
            raise
        self._successes += 1
        if gen == self._gen:
            self._consecutive_failures = 0
            if self._window is not None:
                self._window.add(False, 0.0)
        return result

    async def _call_slow(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        permit = self.acquire()
        try:
            if permit.probe and self.half_open_timeout is not None:
                async with timeout(self.clock, self.half_open_timeout):
                    result = await fn(*args, **kwargs)
            else:
                result = await fn(*args, **kwargs)
        except Exception as exc:
            permit.failure(exc)
            raise
        except BaseException:
            permit.release()
            raise
        permit.success()
        return result

    # -- outcome bookkeeping (called by Permit and call) ---------------------------------

    def _is_excluded(self, exc: BaseException) -> bool:
        if self._exclude and isinstance(exc, self._exclude):
            return True
        predicate = self._exclude_if
        if predicate is None:
            return False
        try:
            return bool(predicate(exc))
        except Exception:
            # The outcome is being recorded (the permit is already spent): raising here
            # would leave a half-open probe slot taken forever. A predicate that cannot
            # decide does not excuse the call: it counts as a failure.
            log.exception(
                "exclude_if predicate raised; the call counts as a failure",
                breaker=self.name,
                error_type=type(exc).__name__,
            )
            return False

    def _on_release(self, gen: int, probe: bool) -> None:
        if probe and gen == self._gen:
            self._probes -= 1

    def _on_success(
        self, gen: int, probe: bool, started: float, elapsed: float | None = None
    ) -> None:
        threshold = self.slow_call_threshold
        if threshold is not None:
            if elapsed is None:
                elapsed = self.clock.monotonic() - started
            if elapsed > threshold:
                self._slow += 1
                self._record_failure(
                    gen,
                    probe,
                    "SlowCall",
                    f"took {elapsed:.3g} s (slow-call threshold {threshold:g} s)",
                )
                return
        self._successes += 1
        if gen != self._gen:
            return  # admitted under a previous state: counted, but decides nothing
        state = self._state
        if state is _CLOSED or state is _DISABLED:
            self._consecutive_failures = 0
            if self._window is not None:
                self._window.add(False, self.clock.monotonic() if self._timed else 0.0)
        elif state is _HALF_OPEN and probe:
            self._probes -= 1
            self._half_open_successes += 1
            if self._half_open_successes >= self.success_threshold:
                self._transition(_CLOSED, f"{self._half_open_successes} probe call(s) succeeded")

    def _on_exception(self, gen: int, probe: bool, started: float, exc: BaseException) -> None:
        if not isinstance(exc, Exception) or self._is_excluded(exc):
            # Cancellation, KeyboardInterrupt and excluded errors say nothing about health.
            if isinstance(exc, Exception):
                self._ignored += 1
            self._on_release(gen, probe)
            return
        if isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError):
            self._timeouts += 1
        self._record_failure(gen, probe, type(exc).__name__, str(exc) or repr(exc))

    def _record_failure(self, gen: int, probe: bool, type_name: str, message: str) -> None:
        now = self.clock.monotonic()
        self._failures += 1
        self._last_failure = FailureInfo(type_name, message, now)
        if gen != self._gen:
            return
        state = self._state
        if state is _CLOSED or state is _DISABLED:
            self._consecutive_failures += 1
            window = self._window
            if window is not None:
                window.add(True, now)
            if state is _DISABLED:
                return
            if self._consecutive_failures >= self.failure_threshold:
                self._trip(
                    f"{self._consecutive_failures} consecutive failures "
                    f"(last: {type_name}: {message})"
                )
            elif (
                window is not None
                and self.failure_rate_threshold is not None
                and window.calls >= self.minimum_calls
                and window.failures * self._rate_den >= self._rate_num * window.calls
            ):
                rate = window.failures / window.calls
                self._trip(
                    f"failure rate {rate:.0%} >= {self.failure_rate_threshold:.0%} "
                    f"over {window.describe()}"
                )
        elif state is _HALF_OPEN and probe:
            self._probes -= 1
            self._trip(f"probe call failed ({type_name}: {message})")

    # -- transitions -------------------------------------------------------------------

    def current_open_duration(self) -> float:
        """How long the next trip would keep the breaker open (grows on repeated trips).

        ``open_duration * multiplier ** trips``, capped at ``max_open_duration`` (24 h,
        or ``open_duration`` if longer, when unset). The cap is checked in log space
        first: after 1,024 doublings the power itself would overflow a float, and a
        device whose GPU has been dead for a week must still fail over.
        """
        base, multiplier, trips = self.open_duration, self.open_duration_multiplier, self._trips
        cap = self.max_open_duration
        if cap is None:
            cap = max(base, _OPEN_DURATION_CEILING)
        if trips == 0 or multiplier == 1.0:
            return min(base, cap)
        if trips * math.log(multiplier) >= math.log(cap / base):
            return cap
        return min(cap, base * multiplier**trips)

    def _trip(self, reason: str) -> None:
        duration = self.current_open_duration()
        self._trips += 1
        self._transition(_OPEN, reason, open_for=duration)

    def close(self) -> None:
        """Cancel the pending OPEN -> HALF_OPEN timer: nothing fires after shutdown.

        The state stays as it is; a later call simply finds the breaker open until
        the next :meth:`reset` or transition.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _to_half_open(self, gen: int) -> None:
        if gen == self._gen and self._state is _OPEN:
            self._transition(_HALF_OPEN, "open period elapsed: testing recovery")

    def _transition(self, to: BreakerState, reason: str, *, open_for: float | None = None) -> None:
        previous = self._state
        now = self.clock.monotonic()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gen += 1
        self._state = to
        self._state_since = now
        self._transitions += 1
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._probes = 0
        self._open_until = None
        if to is _OPEN and open_for is not None:
            self._open_until = now + open_for
            last = self._last_failure
            self._open_reason = (
                f"circuit {self.name!r} is open after repeated failures"
                + (f" (last: {last.type}: {last.message})" if last is not None else "")
                + "; retry in "
            )
            gen = self._gen
            self._timer = self.clock.call_later(open_for, lambda: self._to_half_open(gen))
        elif to is _CLOSED:
            self._trips = 0
            if self._window is not None:
                self._window.clear()
        event = BreakerStateChanged(
            breaker=self.name,
            from_state=str(previous),
            to_state=str(to),
            reason=reason,
            open_for=open_for,
        )
        log_method = log.warning if to in (_OPEN, _FORCED_OPEN) else log.info
        log_method(
            "breaker state changed",
            breaker=self.name,
            from_state=str(previous),
            to_state=str(to),
            reason=reason,
            open_for=open_for,
        )
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener must never break the breaker
                log.exception("breaker listener failed", breaker=self.name)

    # -- manual control ------------------------------------------------------------------

    def force_open(self, reason: str = "forced open by operator") -> None:
        """Reject every call until :meth:`reset` (maintenance, GPU-less mode)."""
        if self._state is not _FORCED_OPEN:
            self._transition(_FORCED_OPEN, reason)

    def disable(self, reason: str = "disabled by operator") -> None:
        """Admit every call and never trip (metrics are still recorded)."""
        if self._state is not _DISABLED:
            self._transition(_DISABLED, reason)

    def trip(self, reason: str = "tripped by operator") -> None:
        """Open now, as if the failure threshold had been reached (timer included)."""
        self._trip(reason)

    def reset(self, reason: str = "reset by operator") -> None:
        """Back to CLOSED with all counters zeroed, from any state."""
        if self._state is not _CLOSED:
            self._transition(_CLOSED, reason)
        self._trips = 0
        self._consecutive_failures = 0
        if self._window is not None:
            self._window.clear()
        self._zero_counters()

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"
