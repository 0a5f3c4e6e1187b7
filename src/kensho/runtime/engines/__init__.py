"""Inference engines: the :class:`Engine` protocol and fault-injecting engines.

The real engines (``torch_engine.TorchEngine``; ``torch_process.TorchProcessEngine``,
the same engine in a child process, which the server runs by default;
:class:`LlamaCppEngine` for GGUF files on llama.cpp, always in a child process)
implement the same protocol; the fault-injecting ones (:class:`MockGPUEngine`,
:class:`MockCPUEngine`) drive tests and demos.
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
from kensho.runtime.engines.llama_engine import LlamaCppEngine

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineKind",
    "EngineStats",
    "FaultyEngine",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "LlamaCppEngine",
    "MockCPUEngine",
    "MockGPUEngine",
    "SupportsHealth",
]
