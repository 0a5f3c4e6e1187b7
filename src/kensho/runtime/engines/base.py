"""The Engine protocol and the request/chunk types every engine speaks.

An engine turns a :class:`GenerationRequest` into a stream of
:class:`GenerationChunk` (one token or a few). The shapes follow what a real
``transformers`` engine needs — a prompt *or* chat messages, sampling parameters,
stop strings, a seed — so the fault-injecting engines used in tests and demos and the
torch engine are interchangeable behind :class:`~kensho.runtime.manager.RuntimeManager`.

``continuation`` is how a stream survives an engine failure: when the GPU dies after
40 tokens, the manager asks the CPU engine for the same request with those 40 tokens'
text as ``continuation`` and ``max_tokens`` reduced accordingly. An engine that sets
``supports_continuation`` must generate *after* that text (for a language model:
append it to the prompt and keep sampling); one that cannot, says so, and the stream
then ends with a clear :class:`~kensho.errors.EngineError` instead.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from kensho.runtime.engines.structured import ResponseFormat, ToolCall, ToolChoice, ToolSpec

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineKind",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "SupportsHealth",
]

EngineKind = Literal["gpu", "cpu", "remote", "other"]
FinishReason = Literal["stop", "length"]

_request_ids = itertools.count(1)


def _next_request_id() -> str:
    return f"req-{next(_request_ids)}"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a chat: ``role`` is ``system``, ``user``, ``assistant`` or ``tool``.

    An assistant turn may carry the ``tool_calls`` it made; a ``tool`` turn is the result
    of one of them, linked by ``tool_call_id``.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """What to generate. Exactly one of ``prompt`` and ``messages`` is set.

    ``seed`` makes sampling reproducible (and lets a fallback engine continue a
    stream the way the primary would have). ``continuation`` is text already produced
    for this request, to be continued rather than repeated (see the module doc).
    """

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    continuation: str = ""
    request_id: str = field(default_factory=_next_request_id)
    # Structured output (see kensho.runtime.engines.structured): only engines that
    # declare supports_constraints may serve a request that sets these.
    response_format: ResponseFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        if (self.prompt is None) == (not self.messages):
            raise ValueError("a GenerationRequest needs exactly one of prompt and messages")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.tool_choice not in {"none", "auto"} and not self.tools:
            raise ValueError("tool_choice requires tools")

    @property
    def constrained(self) -> bool:
        """True when the output must follow a grammar (a response format or tool calls)."""
        return self.response_format is not None or bool(self.tools and self.tool_choice != "none")

    @classmethod
    def chat(
        cls, messages: Sequence[ChatMessage | tuple[str, str]], **kwargs: object
    ) -> GenerationRequest:
        """Build a chat request from messages or ``(role, content)`` pairs."""
        turns = tuple(m if isinstance(m, ChatMessage) else ChatMessage(*m) for m in messages)
        return cls(messages=turns, **kwargs)  # type: ignore[arg-type]

    def continued(self, produced: str, tokens: int) -> GenerationRequest:
        """The same request, to be resumed after ``produced`` (``tokens`` tokens) more text."""
        return dataclasses.replace(
            self,
            continuation=self.continuation + produced,
            max_tokens=max(1, self.max_tokens - tokens),
        )

    @property
    def text_input(self) -> str:
        """The prompt, or the chat flattened as ``role: content`` lines (for simple engines)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationChunk:
    """A piece of a generation stream.

    ``index`` counts tokens from the start of the *original* request (a continued
    stream carries on numbering), ``engine`` names who produced it, and
    ``finish_reason`` is set on the last chunk only.
    """

    text: str
    index: int
    engine: str
    finish_reason: FinishReason | None = None


@runtime_checkable
class Engine(Protocol):
    """An inference engine: loaded once, then streams tokens for many requests.

    ``generate`` must be safe to call concurrently (the executor limits how many run
    at once) and must raise :class:`~kensho.errors.EngineError` subclasses for engine
    faults, so that the breaker can count them; invalid requests should raise
    ``ValueError`` (which the manager's breakers exclude: bad input says nothing about
    the engine's health).
    """

    name: str
    kind: EngineKind
    supports_continuation: bool

    async def load(self) -> None:
        """Prepare the engine (weights onto the device); raise EngineUnavailableError."""

    async def close(self) -> None:
        """Release the device; the engine may be loaded again later."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the chunks for ``request``."""


@runtime_checkable
class SupportsHealth(Protocol):
    """Optional: engines that can tell whether they are able to serve right now."""

    async def health(self) -> bool:
        """True when the engine believes it can serve a request."""
