"""Prometheus metrics for ``GET /metrics``, via prometheus-client.

Request-path metrics (latency, time to first token, tokens, rejections) are updated
as requests happen. State metrics (breaker state and transitions, queue depth per
priority, executor outcomes, integrity results, log events by level, OTLP export
counters) are read from the components' own snapshots at scrape time by a custom
collector, so they can never drift from what the components report through
``metrics()``, ``statistics()`` and ``stats()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kensho.events import ReleaseSnapshot
from kensho.runtime.breaker import BreakerMetrics, BreakerState
from kensho.server._context import ServerContext
from kensho.storage.report import IntegrityStatus

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StateCollector(Collector):
    def __init__(self, context: ServerContext) -> None:
        self._context = context

    def collect(self) -> Iterator[Metric]:
        ctx = self._context
        runtime = ctx.runtime.metrics()
        breakers = [b for b in (runtime.primary, runtime.fallback) if b is not None]
        yield from _breaker_families(breakers)

        active = GaugeMetricFamily(
            "kensho_runtime_degraded", "1 while requests are not served by the primary engine"
        )
        active.add_metric([], 1.0 if runtime.degraded else 0.0)
        yield active
        routed = CounterMetricFamily(
            "kensho_runtime_requests",
            "Requests routed by the runtime, by outcome",
            labels=["route"],
        )
        for route, value in (
            ("primary", runtime.served_by_primary),
            ("fallback", runtime.served_by_fallback),
            ("rerouted", runtime.rerouted),
            ("continued_mid_stream", runtime.continued_mid_stream),
            ("failed", runtime.failed),
            ("rejected", runtime.rejected),
        ):
            routed.add_metric([route], float(value))
        yield routed

        stats = ctx.executor.statistics()
        depth = GaugeMetricFamily(
            "kensho_queue_depth", "Tasks waiting in the executor queue", labels=["priority"]
        )
        for priority, count in stats.queued.items():
            depth.add_metric([priority.lower()], float(count))
        yield depth
        capacity = GaugeMetricFamily(
            "kensho_queue_capacity", "Effective queue capacity (shrinks on a slower engine)"
        )
        capacity.add_metric([], float(stats.capacity))
        yield capacity
        in_flight = GaugeMetricFamily(
            "kensho_tasks_in_flight", "Tasks running, by engine", labels=["engine"]
        )
        for engine, count in stats.in_flight.items():
            in_flight.add_metric([engine], float(count))
        yield in_flight
        outcomes = CounterMetricFamily(
            "kensho_tasks", "Tasks by how they ended (or were refused)", labels=["outcome"]
        )
        for outcome, value in (
            ("accepted", stats.accepted),
            ("completed", stats.completed),
            ("failed", stats.failed),
            ("cancelled", stats.cancelled),
            ("timed_out", stats.timed_out),
            ("shed", stats.shed),
            ("rejected", stats.rejected),
        ):
            outcomes.add_metric([outcome], float(value))
        yield outcomes
        overloaded = GaugeMetricFamily(
            "kensho_executor_overloaded", "1 while only CRITICAL tasks are admitted (hard open)"
        )
        overloaded.add_metric([], 1.0 if stats.overloaded else 0.0)
        yield overloaded

        integrity = GaugeMetricFamily(
            "kensho_integrity_files", "Files by result of the last verification", labels=["status"]
        )
        for status, count in sorted(ctx.integrity.files.items()):
            integrity.add_metric([status], float(count))
        yield integrity
        ok = GaugeMetricFamily(
            "kensho_integrity_ok", "1 when every required file verified at the last check"
        )
        usable = (IntegrityStatus.OK, IntegrityStatus.DEGRADED)
        ok.add_metric([], 1.0 if ctx.integrity.status in usable else 0.0)
        yield ok
        if ctx.release is not None:
            yield from _release_families(ctx.release())

        if ctx.log_counts is not None:
            logs = CounterMetricFamily(
                "kensho_log_events", "Log events emitted, by level", labels=["level"]
            )
            for level, value in ctx.log_counts().items():
                logs.add_metric([level], float(value))
            yield logs
        if ctx.export_stats is not None:
            yield from _export_families(ctx.export_stats())


_DROP_REASONS = ("queue_full", "spool_evicted", "spool_failed", "rejected", "unencodable")


def _export_families(stats: Mapping[str, Mapping[str, int]] | None) -> Iterator[Metric]:
    """OTLP export counters per signal (``logs`` in records, ``traces`` in spans).

    Absent while export is off, so a dashboard can tell "off" from "nothing sent".
    """
    if stats is None:
        return
    exported = CounterMetricFamily(
        "kensho_otlp_exported",
        "Log records and spans the collector accepted, directly or from the spool",
        labels=["signal"],
    )
    spooled = CounterMetricFamily(
        "kensho_otlp_spooled",
        "Log records and spans written to the disk spool while the collector was away",
        labels=["signal"],
    )
    dropped = CounterMetricFamily(
        "kensho_otlp_dropped",
        "Log records and spans lost, by reason (queue full, spool bound or write, "
        "collector refusal, unencodable)",
        labels=["signal", "reason"],
    )
    errors = CounterMetricFamily(
        "kensho_otlp_export_errors",
        "Export requests that failed: unreachable, timed out, or a non-2xx answer",
        labels=["signal"],
    )
    queued = GaugeMetricFamily(
        "kensho_otlp_queue_depth",
        "Log records and spans waiting in memory for the export thread",
        labels=["signal"],
    )
    for signal, counts in stats.items():
        exported.add_metric([signal], float(counts["exported"]))
        spooled.add_metric([signal], float(counts["spooled"]))
        for reason in _DROP_REASONS:
            key = "queue_dropped" if reason == "queue_full" else reason
            dropped.add_metric([signal, reason], float(counts[key]))
        errors.add_metric([signal], float(counts["export_errors"]))
        queued.add_metric([signal], float(counts["queued"]))
    yield from (exported, spooled, dropped, errors, queued)


def _release_families(release: ReleaseSnapshot) -> Iterator[Metric]:
    """Over-the-air releases: serials, staging progress, the last channel check."""
    serial = GaugeMetricFamily(
        "kensho_release_serial", "Release serial served (current) and staged", labels=["release"]
    )
    for which, value in (("current", release.current_serial), ("staged", release.staged_serial)):
        if value is not None:
            serial.add_metric([which], float(value))
    yield serial
    staged = GaugeMetricFamily(
        "kensho_release_staged_bytes",
        "Bytes of the staged release fetched so far, and to fetch",
        labels=["kind"],
    )
    staged.add_metric(["done"], float(release.staged_done))
    staged.add_metric(["total"], float(release.staged_total))
    yield staged
    complete = GaugeMetricFamily(
        "kensho_release_staged_complete", "1 when a staged release can be applied offline"
    )
    complete.add_metric([], 1.0 if release.staged_complete else 0.0)
    yield complete
    if release.last_check_at is not None and release.last_check_result is not None:
        checked = GaugeMetricFamily(
            "kensho_release_last_check_timestamp_seconds",
            "When the release channels were last checked, by result",
            labels=["result"],
        )
        checked.add_metric([release.last_check_result], release.last_check_at)
        yield checked


def _breaker_families(breakers: list[BreakerMetrics]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "kensho_breaker_state", "1 for each breaker's current state", labels=["engine", "state"]
    )
    transitions = CounterMetricFamily(
        "kensho_breaker_transitions", "State changes of each breaker", labels=["engine"]
    )
    calls = CounterMetricFamily(
        "kensho_breaker_calls", "Calls seen by each breaker", labels=["engine", "kind"]
    )
    failure_rate = GaugeMetricFamily(
        "kensho_breaker_failure_rate", "Failure rate over the sliding window", labels=["engine"]
    )
    for b in breakers:
        for s in BreakerState:
            state.add_metric([b.name, s.value], 1.0 if b.state is s else 0.0)
        transitions.add_metric([b.name], float(b.transitions))
        for kind, value in (
            ("successful", b.successes),
            ("failed", b.failures),
            ("slow", b.slow_calls),
            ("timeout", b.timeouts),
            ("not_permitted", b.rejections),
            ("ignored", b.ignored),
        ):
            calls.add_metric([b.name, kind], float(value))
        if b.failure_rate is not None:
            failure_rate.add_metric([b.name], b.failure_rate)
    yield from (state, transitions, calls, failure_rate)


class ServerMetrics:
    """The registry of one server and the request-path instruments."""

    def __init__(self, context: ServerContext) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kensho_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kensho_request_latency_seconds",
            "Completion request latency, from arrival to the last byte",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "kensho_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first token",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "kensho_tokens_generated",
            "Tokens streamed to clients, by engine",
            ["engine"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "kensho_rejections",
            "Requests refused with 429/503/504, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(context))

    def render(self) -> bytes:
        return generate_latest(self.registry)
