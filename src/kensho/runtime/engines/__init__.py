"""Inference engines: the :class:`Engine` protocol and fault-injecting engines.

A real ``transformers`` engine implements the same protocol; the fault-injecting
ones (:class:`MockGPUEngine`, :class:`MockCPUEngine`) drive tests and demos.
"""

from __future__ import annotations

from kensho.runtime.engines.base import (
    ChatMessage,
    Engine,
    EngineKind,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SupportsHealth,
)
from kensho.runtime.engines.faulty import EngineStats, FaultyEngine, MockCPUEngine, MockGPUEngine

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineKind",
    "EngineStats",
    "FaultyEngine",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "MockCPUEngine",
    "MockGPUEngine",
    "SupportsHealth",
]
