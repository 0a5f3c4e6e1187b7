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

What an engine can honour beyond plain sampling is declared in its ``features`` set
(:data:`FEATURES`): logprobs, penalties, logit bias, embeddings, constraints
(structured output and tool calls by constrained decoding). The server refuses a
request field that the engines behind it cannot honour (400 naming the field) rather
than ignoring it; an engine without a ``features`` attribute honours none of them
(:func:`features_of`). An embedding request travels the same road as a completion
(executor, breakers, failover): :meth:`GenerationRequest.embedding` makes one whose
``max_tokens`` is the number of inputs, and the engine answers one chunk per input
carrying its vector, so a continued request embeds only the inputs still to do.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from kensho.runtime.engines.structured import ResponseFormat, ToolCall, ToolChoice, ToolSpec

__all__ = [
    "FEATURES",
    "MAX_TOP_LOGPROBS",
    "ChatMessage",
    "EmbeddingInput",
    "Engine",
    "EngineKind",
    "Feature",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "SupportsHealth",
    "TokenLogprob",
    "common_features",
    "features_of",
    "merge_chunks",
]

EngineKind = Literal["gpu", "cpu", "remote", "other"]
FinishReason = Literal["stop", "length"]
Feature = Literal["logprobs", "penalties", "logit_bias", "embeddings", "constraints"]
FEATURES: frozenset[Feature] = frozenset(
    {"logprobs", "penalties", "logit_bias", "embeddings", "constraints"}
)
MAX_TOP_LOGPROBS = 20
EmbeddingInput = str | tuple[int, ...]
"""One input to embed: text, or token ids of the served model's tokenizer."""

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
    """What to generate. Exactly one of ``prompt``, ``messages`` and ``embed`` is set.

    ``logprobs``/``top_logprobs``, the OpenAI penalties and ``logit_bias`` (token id,
    bias) pairs need the engine features of the same names (:attr:`needs`).

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
    logprobs: bool = False
    top_logprobs: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    embed: tuple[EmbeddingInput, ...] = ()
    # Structured output (see kensho.runtime.engines.structured): only engines whose
    # features hold "constraints" may serve a request that sets these.
    response_format: ResponseFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        inputs = (self.prompt is not None) + bool(self.messages) + bool(self.embed)
        if inputs != 1:
            raise ValueError("a GenerationRequest needs exactly one of prompt, messages and embed")
        if self.embed and self.max_tokens > len(self.embed):
            raise ValueError("an embedding request's max_tokens counts its inputs")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
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
    def embedding(cls, inputs: Sequence[EmbeddingInput], **kwargs: Any) -> GenerationRequest:
        """A request for one vector per input (``max_tokens`` counts the inputs)."""
        return cls(embed=tuple(inputs), max_tokens=len(inputs), **kwargs)

    @property
    def pending_embeddings(self) -> tuple[EmbeddingInput, ...]:
        """The inputs still to embed: the last ``max_tokens`` (a continued request
        has fewer; the first ones were embedded by the engine that failed)."""
        return self.embed[len(self.embed) - self.max_tokens :]

    @property
    def needs(self) -> frozenset[Feature]:
        """The engine features this request relies on (see :func:`features_of`)."""
        wanted: set[Feature] = set()
        if self.logprobs:
            wanted.add("logprobs")
        if self.frequency_penalty or self.presence_penalty:
            wanted.add("penalties")
        if self.logit_bias:
            wanted.add("logit_bias")
        if self.embed:
            wanted.add("embeddings")
        return frozenset(wanted)

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
        if self.embed:
            return "\n".join(i if isinstance(i, str) else str(list(i)) for i in self.embed)
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token and its log-probability, with the ``top`` alternatives.

    ``top`` holds ``(token, logprob)`` pairs, most likely first, as many as the
    request's ``top_logprobs``; ``token_bytes`` are the token's exact bytes (a token
    may hold part of a UTF-8 character, which ``token`` then shows as U+FFFD).
    """

    token: str
    logprob: float
    token_bytes: bytes
    top: tuple[tuple[str, float, bytes], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationChunk:
    """A piece of a generation stream.

    ``index`` counts tokens from the start of the *original* request (a continued
    stream carries on numbering), ``engine`` names who produced it, and
    ``finish_reason`` is set on the last chunk only. ``prompt_tokens`` (first chunk)
    is the length of the prompt in the model's tokens; ``logprobs`` the tokens this
    chunk stands for, when the request asked; ``embedding`` the vector of input
    ``index`` of an embedding request.

    A chunk is one token, except when its consumer fell behind: then the tokens that
    piled up meanwhile come as one chunk (see :func:`merge_chunks`), ``tokens`` says
    how many, and ``index`` is the last one's. Count ``tokens``, never chunks.
    """

    text: str
    index: int
    engine: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    embedding: tuple[float, ...] | None = None
    tokens: int = 1


def merge_chunks(chunks: Sequence[GenerationChunk]) -> list[GenerationChunk]:
    """Chunks that waited for a consumer, as few chunks as their meaning allows.

    A slow reader (a client on a slow link, a loop that was busy) would otherwise pay
    one hand-off, one SSE event and one socket write per token it is behind, and fall
    further behind. Tokens of one engine merge into one chunk: their texts joined,
    their logprob entries in order, the first ``prompt_tokens``, the last ``index``
    and ``finish_reason``. Embedding vectors (one input each) and a change of engine
    (a failover mid-stream) stay apart. A single chunk is returned as it is.
    """
    if len(chunks) < 2:
        return list(chunks)
    merged: list[GenerationChunk] = []
    run: list[GenerationChunk] = []
    for chunk in chunks:
        if run and (chunk.embedding is not None or chunk.engine != run[0].engine):
            merged.append(_joined(run))
            run = []
        if chunk.embedding is not None:
            merged.append(chunk)
        else:
            run.append(chunk)
    if run:
        merged.append(_joined(run))
    return merged


def _joined(run: list[GenerationChunk]) -> GenerationChunk:
    if len(run) == 1:
        return run[0]
    last = run[-1]
    return GenerationChunk(
        text="".join(c.text for c in run),
        index=last.index,
        engine=last.engine,
        finish_reason=last.finish_reason,
        prompt_tokens=next((c.prompt_tokens for c in run if c.prompt_tokens is not None), None),
        logprobs=tuple(entry for c in run for entry in c.logprobs),
        tokens=sum(c.tokens for c in run),
    )


@runtime_checkable
class Engine(Protocol):
    """An inference engine: loaded once, then streams tokens for many requests.

    ``generate`` must be safe to call concurrently (the executor limits how many run
    at once) and must raise :class:`~kensho.errors.EngineError` subclasses for engine
    faults, so that the breaker can count them; invalid requests should raise
    ``ValueError`` (which the manager's breakers exclude: bad input says nothing about
    the engine's health). An optional ``features`` attribute (a set of
    :data:`Feature`) declares what it honours beyond plain sampling; it is not part of
    the protocol so that engines predating it still fit (they honour none).
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


def features_of(engine: object) -> frozenset[Feature]:
    """What ``engine`` declares it honours; an engine that declares nothing honours none."""
    declared: Iterable[object] = getattr(engine, "features", ())
    return frozenset(f for f in declared if f in FEATURES)


def common_features(engines: Iterable[object | None]) -> frozenset[Feature]:
    """The features every one of ``engines`` honours (``None`` entries are skipped):
    a request may fail over from one to the other, and must mean the same on both."""
    present = [features_of(e) for e in engines if e is not None]
    return frozenset.intersection(*present) if present else frozenset()


@runtime_checkable
class SupportsHealth(Protocol):
    """Optional: engines that can tell whether they are able to serve right now."""

    async def health(self) -> bool:
        """True when the engine believes it can serve a request."""
