"""CircuitBreaker: every transition and threshold, on virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kensho.errors import CircuitOpenError, EngineError
from kensho.events import BreakerStateChanged, Event
from kensho.runtime.breaker import FORCED_OPEN_RETRY_AFTER, BreakerState, CircuitBreaker, Permit
from kensho.runtime.clock import VirtualClock
from kensho.telemetry.testing import capture_logs

S = BreakerState


async def ok() -> str:
    return "ok"


async def boom() -> str:
    raise EngineError("GPU fell over")


def make(clock: VirtualClock, **kwargs: Any) -> tuple[CircuitBreaker, list[BreakerStateChanged]]:
    events: list[BreakerStateChanged] = []

    def listen(event: Event) -> None:
        assert isinstance(event, BreakerStateChanged)
        events.append(event)

    breaker = CircuitBreaker("gpu", clock=clock, listeners=[listen], **kwargs)
    return breaker, events


async def fail_n(breaker: CircuitBreaker, n: int, fn: Callable[[], Awaitable[str]] = boom) -> None:
    for _ in range(n):
        with pytest.raises(EngineError):
            await breaker.call(fn)


# -- CLOSED -> OPEN ----------------------------------------------------------------------


async def test_trips_after_failure_threshold_consecutive_failures() -> None:
    clock = VirtualClock()
    breaker, events = make(clock, failure_threshold=3)
    await fail_n(breaker, 2)
    assert breaker.state is S.CLOSED
    assert breaker.metrics().consecutive_failures == 2
    await fail_n(breaker, 1)
    assert breaker.state is S.OPEN
    assert [(e.from_state, e.to_state) for e in events] == [("closed", "open")]
    assert "3 consecutive failures" in events[0].reason
    assert "GPU fell over" in events[0].reason


async def test_a_success_resets_the_consecutive_count() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=3)
    await fail_n(breaker, 2)
    assert await breaker.call(ok) == "ok"
    await fail_n(breaker, 2)
    assert breaker.state is S.CLOSED
    assert breaker.metrics().consecutive_failures == 2


async def test_open_rejects_without_calling_and_gives_retry_after() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=1, open_duration=60)
    await fail_n(breaker, 1)
    await clock.advance(15)
    called = False

    async def spy() -> str:
        nonlocal called
        called = True
        return "x"

    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(spy)
    assert not called
    assert info.value.retry_after == pytest.approx(45)
    assert "'gpu'" in str(info.value) and "retry in 45.0 s" in str(info.value)
    assert "GPU fell over" in str(info.value)
    assert breaker.metrics().rejections == 1


async def test_failure_rate_over_count_window_trips_without_consecutive_failures() -> None:
    clock = VirtualClock()
    breaker, events = make(
        clock,
        failure_threshold=100,
        failure_rate_threshold=0.5,
        window_size=10,
        minimum_calls=10,
    )
    # Alternate: never 2 failures in a row, yet a 50 % failure rate.
    for i in range(9):
        if i % 2:
            await fail_n(breaker, 1)
        else:
            await breaker.call(ok)
    assert breaker.state is S.CLOSED  # 9 calls: below minimum_calls
    assert breaker.metrics().failure_rate is None
    await fail_n(breaker, 1)  # 10 calls, 5 failures
    assert breaker.state is S.OPEN
    assert "failure rate 50%" in events[-1].reason
    assert "last 10 calls" in events[-1].reason


@pytest.mark.parametrize(("calls", "failures", "threshold"), [(100, 55, 0.55), (25, 7, 0.28)])
async def test_a_failure_rate_exactly_at_the_threshold_opens(
    calls: int, failures: int, threshold: float
) -> None:
    # 0.55 * 100 is 55.000...01 in floats: a float product kept this breaker CLOSED.
    clock = VirtualClock()
    breaker, events = make(
        clock,
        failure_threshold=calls + 1,
        failure_rate_threshold=threshold,
        window_size=calls,
        minimum_calls=calls,
    )
    for _ in range(calls - failures + 1):
        await breaker.call(ok)
    await fail_n(breaker, failures - 1)  # a full window, one failure short
    assert breaker.state is S.CLOSED
    assert breaker.metrics().failure_rate == (failures - 1) / calls
    await fail_n(breaker, 1)  # the oldest success slides out: exactly at the threshold
    assert breaker.metrics().failure_rate == threshold
    assert breaker.state is S.OPEN
    assert f"failure rate {threshold:.0%} >= {threshold:.0%}" in events[-1].reason


async def test_minimum_calls_is_clamped_to_a_smaller_count_window() -> None:
    # resilience4j's rule: the default minimum of 10 could never be met by 5 calls.
    clock = VirtualClock()
    breaker, events = make(clock, failure_threshold=100, failure_rate_threshold=0.5, window_size=5)
    assert breaker.minimum_calls == 5
    await breaker.call(ok)
    await fail_n(breaker, 3)
    assert breaker.state is S.CLOSED  # 4 calls: the window is not full yet
    assert breaker.metrics().failure_rate is None
    await fail_n(breaker, 1)  # 4 of 5 fail
    assert breaker.state is S.OPEN
    assert "failure rate 80% >= 50% over the last 5 calls" in events[-1].reason
    # A time window is in seconds, not calls: its minimum is kept as given.
    timed, _ = make(clock, failure_rate_threshold=0.5, window_type="time", window_size=5)
    assert timed.minimum_calls == 10


async def test_count_window_forgets_old_outcomes() -> None:
    clock = VirtualClock()
    breaker, _ = make(
        clock, failure_threshold=100, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    await fail_n(breaker, 1)
    for _ in range(4):
        await breaker.call(ok)
    m = breaker.metrics()
    assert m.window_calls == 4
    assert m.failure_rate == 0.0


async def test_time_window_ages_out_old_failures() -> None:
    clock = VirtualClock()
    breaker, _ = make(
        clock,
        failure_threshold=100,
        failure_rate_threshold=0.6,
        window_type="time",
        window_size=10,
        minimum_calls=4,
    )
    await fail_n(breaker, 2)
    await clock.advance(20)  # those two failures leave the 10 s window
    await breaker.call(ok)
    await breaker.call(ok)
    await fail_n(breaker, 2)
    m = breaker.metrics()
    assert m.window_calls == 4
    assert m.failure_rate == pytest.approx(0.5)
    assert breaker.state is S.CLOSED
    await fail_n(breaker, 1)  # 3 of 5 = 60 %
    assert breaker.state is S.OPEN


async def test_slow_calls_count_as_failures() -> None:
    clock = VirtualClock()
    breaker, events = make(clock, failure_threshold=2, slow_call_threshold=1.0)

    async def slow() -> str:
        await clock.sleep(2)
        return "late"

    for _ in range(2):
        task = asyncio.create_task(breaker.call(slow))
        await clock.advance(2)
        assert await task == "late"  # the caller still gets its result
    m = breaker.metrics()
    assert m.slow_calls == 2
    assert m.failures == 2
    assert breaker.state is S.OPEN
    assert "slow-call threshold" in events[-1].reason


async def test_fast_call_under_slow_threshold_is_a_success() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=1, slow_call_threshold=1.0)
    assert await breaker.call(ok) == "ok"
    assert breaker.metrics().successes == 1
    assert breaker.state is S.CLOSED


async def test_excluded_exceptions_count_neither_way() -> None:
    clock = VirtualClock()
    breaker, _ = make(
        clock,
        failure_threshold=1,
        exclude=[ValueError],
        exclude_if=lambda exc: "client" in str(exc),
    )

    async def bad_input() -> str:
        raise ValueError("prompt too long")

    async def client_error() -> str:
        raise RuntimeError("client went away")

    with pytest.raises(ValueError):
        await breaker.call(bad_input)
    with pytest.raises(RuntimeError):
        await breaker.call(client_error)
    m = breaker.metrics()
    assert breaker.state is S.CLOSED
    assert (m.failures, m.successes, m.ignored) == (0, 0, 2)


async def test_a_raising_exclude_if_counts_as_failure_and_frees_the_probe_slot() -> None:
    clock = VirtualClock()

    def broken(exc: BaseException) -> bool:
        raise KeyError("predicate bug")

    breaker, _ = make(
        clock, failure_threshold=1, open_duration=10, half_open_timeout=None, exclude_if=broken
    )
    with capture_logs() as logs:
        await fail_n(breaker, 1)  # the caller sees the engine's error, not the predicate's
    assert breaker.state is S.OPEN
    assert breaker.metrics().failures == 1
    failed = [
        e for e in logs if e["event"] == "exclude_if predicate raised; the call counts as a failure"
    ]
    assert failed and failed[0]["breaker"] == "gpu"
    await clock.advance(10)
    probe = breaker.acquire()
    assert probe.probe
    probe.failure(EngineError("still down"))  # the predicate raises again
    assert breaker.state is S.OPEN
    assert breaker.metrics().probes_in_flight == 0
    await clock.advance(10)
    assert breaker.state is S.HALF_OPEN
    await breaker.call(ok)  # the slot was freed: a new probe gets in
    await breaker.call(ok)
    assert breaker.state is S.CLOSED


async def test_cancellation_is_not_a_failure() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=1)

    async def forever() -> str:
        await clock.sleep(1000)
        return "never"

    task = asyncio.create_task(breaker.call(forever))
    await clock.settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is S.CLOSED
    assert breaker.metrics().failures == 0


# -- OPEN -> HALF_OPEN -> CLOSED / OPEN ------------------------------------------------


async def test_timer_moves_open_to_half_open_with_no_traffic() -> None:
    clock = VirtualClock()
    breaker, events = make(clock, failure_threshold=1, open_duration=60)
    await fail_n(breaker, 1)
    assert breaker.metrics().open_until == 60
    await clock.advance(59.9)
    assert breaker.state is S.OPEN
    await clock.advance(0.1)
    # Nobody called: the timer alone announced the change.
    assert breaker.state is S.HALF_OPEN
    assert [(e.from_state, e.to_state) for e in events] == [
        ("closed", "open"),
        ("open", "half_open"),
    ]
    assert events[0].open_for == 60
    assert "next test in 60 s" in events[0].message


async def test_half_open_closes_after_success_threshold_successes() -> None:
    clock = VirtualClock()
    breaker, events = make(clock, failure_threshold=1, success_threshold=2, open_duration=10)
    await fail_n(breaker, 1)
    await clock.advance(10)
    await breaker.call(ok)
    assert breaker.state is S.HALF_OPEN
    await breaker.call(ok)
    assert breaker.state is S.CLOSED
    assert events[-1].to_state == "closed"
    assert "2 probe call(s) succeeded" in events[-1].reason


async def test_any_probe_failure_reopens() -> None:
    clock = VirtualClock()
    breaker, events = make(clock, failure_threshold=1, success_threshold=3, open_duration=10)
    await fail_n(breaker, 1)
    await clock.advance(10)
    await breaker.call(ok)
    await fail_n(breaker, 1)
    assert breaker.state is S.OPEN
    assert events[-1].from_state == "half_open"
    assert "probe call failed" in events[-1].reason


async def test_many_concurrent_callers_in_half_open_only_max_calls_get_through() -> None:
    clock = VirtualClock()
    breaker, _ = make(
        clock,
        failure_threshold=1,
        open_duration=10,
        half_open_max_calls=3,
        success_threshold=3,
        half_open_timeout=None,
    )
    await fail_n(breaker, 1)
    await clock.advance(10)
    gate = asyncio.Event()
    running = 0
    peak = 0

    async def probe() -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return "ok"

    tasks = [asyncio.create_task(breaker.call(probe)) for _ in range(100)]
    await clock.settle()
    assert peak == 3
    assert breaker.metrics().probes_in_flight == 3
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    admitted = [o for o in outcomes if o == "ok"]
    rejected = [o for o in outcomes if isinstance(o, CircuitOpenError)]
    assert len(admitted) == 3
    assert len(rejected) == 97
    assert "testing recovery with 3 probe call(s)" in str(rejected[0])
    assert breaker.state is S.CLOSED
    assert peak == 3


async def test_a_cancelled_probe_frees_its_slot() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=1, open_duration=10, half_open_timeout=None)
    await fail_n(breaker, 1)
    await clock.advance(10)
    permit = breaker.acquire()
    assert permit.probe
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    permit.release()
    second = breaker.acquire()
    assert second.probe
    second.success()
    second.success()  # reporting twice is a no-op
    assert breaker.metrics().successes == 1


async def test_probe_timeout_counts_as_failure_and_reopens() -> None:
    clock = VirtualClock()
    breaker, events = make(clock, failure_threshold=1, open_duration=10, half_open_timeout=5)
    await fail_n(breaker, 1)
    await clock.advance(10)

    async def hang() -> str:
        await clock.sleep(3600)
        return "never"

    task = asyncio.create_task(breaker.call(hang))
    await clock.advance(4.9)
    assert breaker.state is S.HALF_OPEN
    await clock.advance(0.1)
    with pytest.raises(TimeoutError):
        await task
    m = breaker.metrics()
    assert m.timeouts == 1
    assert m.state is S.OPEN
    assert "probe call failed (TimeoutError" in events[-1].reason


async def test_open_duration_grows_on_repeated_trips_up_to_cap() -> None:
    clock = VirtualClock()
    breaker, events = make(
        clock,
        failure_threshold=1,
        open_duration=10,
        open_duration_multiplier=2,
        max_open_duration=35,
    )
    await fail_n(breaker, 1)
    durations = []
    for _ in range(4):
        durations.append(events[-1].open_for)
        await clock.advance(events[-1].open_for or 0)
        assert breaker.state is S.HALF_OPEN
        await fail_n(breaker, 1)
    durations.append(events[-1].open_for)
    assert durations == [10, 20, 35, 35, 35]
    # Closing resets the growth.
    await clock.advance(35)
    await breaker.call(ok)
    await breaker.call(ok)
    assert breaker.state is S.CLOSED
    await fail_n(breaker, 1)
    assert events[-1].open_for == 10


@pytest.mark.parametrize(("cap", "longest"), [(30.0, 30.0), (None, 86_400.0)])
async def test_more_than_1024_failed_probes_never_overflow(
    cap: float | None, longest: float
) -> None:
    # multiplier ** trips overflowed a float at the 1,024th trip and wedged the breaker.
    clock = VirtualClock()
    breaker, events = make(
        clock,
        failure_threshold=1,
        open_duration=1,
        open_duration_multiplier=2,
        max_open_duration=cap,
        half_open_timeout=None,
    )
    await fail_n(breaker, 1)
    for _ in range(1100):
        await clock.advance(events[-1].open_for or 0)
        assert breaker.state is S.HALF_OPEN
        await fail_n(breaker, 1)  # the engine's error, never OverflowError
    assert breaker.state is S.OPEN
    assert breaker.metrics().trips == 1101
    assert events[-1].open_for == longest
    assert breaker.current_open_duration() == longest
    await clock.advance(longest)
    assert await breaker.call(ok) == "ok"  # still probing after the long outage


async def test_late_outcome_of_a_call_admitted_before_the_trip_decides_nothing() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=1, open_duration=10, half_open_timeout=None)
    old = breaker.acquire()  # admitted while CLOSED
    await fail_n(breaker, 1)
    await clock.advance(10)
    assert breaker.state is S.HALF_OPEN
    old.failure(EngineError("late"))  # must not reopen: it is not a probe
    assert breaker.state is S.HALF_OPEN
    assert breaker.metrics().failures == 2


class LateTimersClock(VirtualClock):
    """A virtual clock whose reading can run ahead of its timers, as a busy loop's does."""

    def __init__(self) -> None:
        super().__init__()
        self.ahead = 0.0

    def monotonic(self) -> float:
        return super().monotonic() + self.ahead


async def test_late_timer_is_caught_up_by_acquire() -> None:
    clock = LateTimersClock()
    breaker, _ = make(clock, failure_threshold=1, open_duration=10, half_open_timeout=None)
    await fail_n(breaker, 1)
    clock.ahead = 11  # time moved but the timer has not fired yet
    assert clock.pending_timers == 1
    permit = breaker.acquire()
    assert permit.probe and breaker.state is S.HALF_OPEN


# -- manual control ---------------------------------------------------------------------


async def test_force_open_rejects_everything_until_reset() -> None:
    clock = VirtualClock()
    breaker, events = make(clock, open_duration=30)
    breaker.force_open()
    await clock.advance(1000)  # no timer: forced open stays open
    with pytest.raises(CircuitOpenError, match="forced open") as info:
        await breaker.call(ok)
    # No probe is scheduled: not a made-up cool-down (open_duration), a short re-check.
    assert info.value.retry_after == FORCED_OPEN_RETRY_AFTER
    assert breaker.admission_delay() is None
    assert "until it is reset" in str(info.value)
    breaker.reset()
    assert await breaker.call(ok) == "ok"
    assert [e.to_state for e in events] == ["forced_open", "closed"]
    assert breaker.metrics().rejections == 0  # reset zeroes the counters


async def test_disabled_admits_everything_and_never_trips_but_records() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=1)
    breaker.disable()
    await fail_n(breaker, 5)
    assert breaker.state is S.DISABLED
    m = breaker.metrics()
    assert m.failures == 5
    assert m.consecutive_failures == 5
    assert breaker.is_closed


async def test_manual_trip_and_reset_from_open() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, open_duration=5)
    breaker.trip("maintenance")
    assert breaker.state is S.OPEN
    assert breaker.retry_after() == 5
    breaker.reset()
    assert breaker.state is S.CLOSED
    await clock.advance(10)  # the old timer must not fire into the new state
    assert breaker.state is S.CLOSED


# -- metrics, events, logs, validation ------------------------------------------------


async def test_metrics_snapshot_is_complete_and_immutable() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=2, open_duration=10)
    await breaker.call(ok)
    await fail_n(breaker, 2)
    await clock.advance(3)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    m = breaker.metrics()
    assert m.state is S.OPEN
    assert (m.successes, m.failures, m.rejections, m.transitions, m.trips) == (1, 2, 1, 1, 1)
    assert m.time_in_state == 3
    assert m.open_until == 10
    assert m.last_failure is not None
    assert m.last_failure.type == "EngineError"
    assert m.last_failure.message == "GPU fell over"
    assert m.last_failure.at == 0
    with pytest.raises(AttributeError):
        m.state = S.CLOSED  # type: ignore[misc]
    data = m.to_dict()
    assert data["state"] == "open"
    assert data["last_failure"] == {"type": "EngineError", "message": "GPU fell over", "at": 0}


async def test_transitions_are_logged_with_the_breaker_service() -> None:
    clock = VirtualClock()
    breaker, _ = make(clock, failure_threshold=1)
    with capture_logs() as logs:
        await fail_n(breaker, 1)
    changed = [e for e in logs if e["event"] == "breaker state changed"]
    assert len(changed) == 1
    assert changed[0]["service"] == "runtime.breaker"
    assert changed[0]["level"] == "warning"
    assert changed[0]["to_state"] == "open"


async def test_a_failing_listener_does_not_break_the_breaker() -> None:
    clock = VirtualClock()

    def bad(event: Event) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker("gpu", clock=clock, failure_threshold=1, listeners=[bad])
    seen: list[Event] = []
    breaker.add_listener(seen.append)
    with capture_logs() as logs:
        await fail_n(breaker, 1)
    assert breaker.state is S.OPEN
    assert len(seen) == 1
    assert any(e["event"] == "breaker listener failed" for e in logs)
    breaker.remove_listener(seen.append)
    breaker.remove_listener(seen.append)  # unknown: ignored
    breaker.reset()
    assert len(seen) == 1


def test_event_serialises_to_json_ready_data() -> None:
    event = BreakerStateChanged(
        breaker="gpu", from_state="closed", to_state="open", reason="3 failures", open_for=60
    )
    data = event.to_dict()
    assert data["kind"] == "breaker.state_changed"
    assert data["message"] == "breaker gpu: closed -> open (3 failures), next test in 60 s"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"open_duration": 0}, "open_duration"),
        ({"open_duration_multiplier": 0.5}, "multiplier"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"window_size": 0}, "window_size"),
        ({"window_size": 2.5}, "whole number"),
        ({"window_type": "calls"}, "window_type"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"max_open_duration": 0}, "max_open_duration"),
        ({"open_duration": float("nan")}, "open_duration"),
        ({"open_duration_multiplier": float("inf")}, "multiplier"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(clock=VirtualClock(), **kwargs)


# -- Hypothesis: breaker invariants under any sequence of operations --------------------


class BreakerMachine(RuleBasedStateMachine):
    """Random calls, outcomes, time jumps and manual controls; invariants after each."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = VirtualClock()
        self.events: list[BreakerStateChanged] = []
        self.breaker = CircuitBreaker(
            "gpu",
            clock=self.clock,
            failure_threshold=2,
            success_threshold=2,
            open_duration=5,
            open_duration_multiplier=2,
            max_open_duration=20,
            half_open_max_calls=2,
            half_open_timeout=None,
            failure_rate_threshold=0.5,
            window_size=6,
            minimum_calls=4,
            listeners=[self._on_event],
        )
        self.held: list[Permit] = []
        self.rejections = 0
        self.outcomes = 0
        self.was_reset = False

    def _on_event(self, event: Event) -> None:
        assert isinstance(event, BreakerStateChanged)
        if self.events:
            assert event.from_state == self.events[-1].to_state  # a connected path
        self.events.append(event)

    def teardown(self) -> None:
        self.loop.close()

    @rule(n=st.integers(1, 10))
    def acquire(self, n: int) -> None:
        """``n`` concurrent callers arrive and hold their permits."""
        for _ in range(n):
            try:
                self.held.append(self.breaker.acquire())
            except CircuitOpenError as exc:
                self.rejections += 1
                assert exc.retry_after >= 0
                assert self.breaker.state in (S.OPEN, S.HALF_OPEN, S.FORCED_OPEN)

    @rule(outcome=st.sampled_from(["ok", "fail"]), n=st.integers(1, 3))
    def call_now(self, outcome: str, n: int) -> None:
        """``n`` calls in a row that complete at once (the common case)."""
        for _ in range(n):
            try:
                permit = self.breaker.acquire()
            except CircuitOpenError:
                self.rejections += 1
                continue
            if outcome == "ok":
                permit.success()
            else:
                permit.failure(EngineError("x"))
            self.outcomes += 1

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(min_value=0), outcome=st.sampled_from(["ok", "fail", "release"]))
    def finish(self, index: int, outcome: str) -> None:
        permit = self.held.pop(index % len(self.held))
        if outcome == "ok":
            permit.success()
            self.outcomes += 1
        elif outcome == "fail":
            permit.failure(EngineError("x"))
            self.outcomes += 1
        else:
            permit.release()

    @rule(seconds=st.sampled_from([1, 5, 10, 20]))
    def advance(self, seconds: float) -> None:
        self.loop.run_until_complete(self.clock.advance(seconds))

    @rule()
    def next_timer(self) -> None:
        """Jump to the breaker's next deadline (OPEN -> HALF_OPEN), whatever it is."""
        self.loop.run_until_complete(self.clock.advance_to_next())

    @rule(action=st.sampled_from(["force_open", "reset", "disable"]))
    def manual(self, action: str) -> None:
        getattr(self.breaker, action)()
        self.was_reset = self.was_reset or action == "reset"

    @invariant()
    def probes_never_exceed_the_limit(self) -> None:
        m = self.breaker.metrics()
        assert 0 <= m.probes_in_flight <= self.breaker.half_open_max_calls
        if m.state is not S.HALF_OPEN:
            assert m.probes_in_flight == 0

    @invariant()
    def open_means_a_pending_deadline(self) -> None:
        m = self.breaker.metrics()
        if m.state is S.OPEN:
            assert m.open_until is not None
            assert m.open_until > self.clock.monotonic()  # the timer never lets it go stale
            assert 5 <= m.open_until - (self.clock.monotonic() - m.time_in_state) <= 20
        else:
            assert m.open_until is None

    @invariant()
    def closed_is_below_the_threshold(self) -> None:
        m = self.breaker.metrics()
        if m.state is S.CLOSED:
            assert m.consecutive_failures < self.breaker.failure_threshold

    @invariant()
    def counters_match_what_happened(self) -> None:
        m = self.breaker.metrics()
        if not self.was_reset:  # reset() zeroes the counters
            assert m.rejections == self.rejections
            assert m.successes + m.failures == self.outcomes
            assert m.transitions == len(self.events)


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_usable_from_synchronous_code_without_an_event_loop() -> None:
    breaker = CircuitBreaker("sync", failure_threshold=1, open_duration=1e-9)
    permit = breaker.acquire()
    permit.failure(EngineError("down"))  # trips: no loop to run the timer, no crash
    assert breaker.state is S.OPEN
    probe = breaker.acquire()  # the deadline has passed: caught up on this call
    assert probe.probe
    assert breaker.state is S.HALF_OPEN
    probe.success()
    breaker.acquire().success()
    assert breaker.state is S.CLOSED


async def test_closed_breaker_holds_no_lock_around_calls() -> None:
    breaker, _ = make(VirtualClock())
    gate = asyncio.Event()
    running = 0
    peak = 0

    async def slow() -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return "ok"

    tasks = [asyncio.create_task(breaker.call(slow)) for _ in range(50)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert peak == 50  # all in flight together: nothing serialises them
    gate.set()
    assert await asyncio.gather(*tasks) == ["ok"] * 50
    assert breaker.metrics().successes == 50
