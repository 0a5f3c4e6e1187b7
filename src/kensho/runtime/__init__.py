"""The resilient runtime (roadmap task #20): engines, circuit breaker, failover, executor.

::

    from kensho.runtime import (
        MockCPUEngine, MockGPUEngine, Priority, RuntimeManager, TaskExecutor,
    )

    runtime = RuntimeManager(MockGPUEngine(), MockCPUEngine())
    async with runtime, TaskExecutor(runtime) as executor:
        handle = executor.submit(GenerationRequest(prompt="hi"), priority=Priority.HIGH)
        async for chunk in handle:
            ...

Every time-dependent piece takes a ``clock``; tests pass a :class:`VirtualClock`.
"""

from __future__ import annotations

from kensho.hub import EventHub
from kensho.runtime.admission import Admission
from kensho.runtime.breaker import (
    BreakerMetrics,
    BreakerState,
    CircuitBreaker,
    FailureInfo,
    Permit,
)
from kensho.runtime.clock import (
    AsyncioClock,
    Clock,
    MockClock,
    TimerHandle,
    VirtualClock,
    timeout,
)
from kensho.runtime.engines import (
    ChatMessage,
    Engine,
    EngineKind,
    EngineStats,
    FaultyEngine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    MockCPUEngine,
    MockGPUEngine,
    SupportsHealth,
)
from kensho.runtime.executor import Backend, ExecutorStatistics, TaskExecutor
from kensho.runtime.manager import RuntimeManager, RuntimeMetrics
from kensho.runtime.task import (
    ChunkChannel,
    Priority,
    TaskControl,
    TaskHandle,
    TaskOutcome,
    TaskState,
)

__all__ = [
    "Admission",
    "AsyncioClock",
    "Backend",
    "BreakerMetrics",
    "BreakerState",
    "ChatMessage",
    "ChunkChannel",
    "CircuitBreaker",
    "Clock",
    "Engine",
    "EngineKind",
    "EngineStats",
    "EventHub",
    "ExecutorStatistics",
    "FailureInfo",
    "FaultyEngine",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "MockCPUEngine",
    "MockClock",
    "MockGPUEngine",
    "Permit",
    "Priority",
    "RuntimeManager",
    "RuntimeMetrics",
    "SupportsHealth",
    "TaskControl",
    "TaskExecutor",
    "TaskHandle",
    "TaskOutcome",
    "TaskState",
    "TimerHandle",
    "VirtualClock",
    "timeout",
]
