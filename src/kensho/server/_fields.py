"""The field audit: every request field is honoured, or refused with a 400 naming it.

Applications break silently when a server drops what they asked for (JSON prose where
a schema was required, no logprobs, no penalties). So each field of OpenAI's chat and
completions schemas has one of three fates here, and the README's table lists them:

- honoured by the server on every engine (sampling, stop, seed, stream, usage ...);
- honoured when the engines behind the server declare the feature it needs
  (``logprobs``, penalties, ``logit_bias``: :data:`~kensho.runtime.engines.base.FEATURES`),
  refused otherwise. A request may fail over from the primary to the fallback, so what
  counts is what *both* engines honour (:func:`~kensho.runtime.engines.base.common_features`);
- refused whenever it asks for something a local text model does not do (``audio``,
  ``modalities`` beyond text, ``prediction``, ``n > 1`` ...), with the reason.

A value that asks for nothing (``null``, ``false``, a zero penalty, an empty bias) is
accepted everywhere: the official client and the frameworks send defaults explicitly.
A field OpenAI does not define is refused as OpenAI refuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

from kensho.runtime.engines.base import Feature
from kensho.server._errors import APIError
from kensho.server._schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = [
    "audit_chat",
    "audit_completion",
    "audit_embedding",
    "require_features",
]

_Rule = Callable[[Any], str | None]  # the reason to refuse a value, or None


def _unless_none(reason: str) -> _Rule:
    return lambda value: None if value is None else reason


def _modalities(value: Any) -> str | None:
    if value is None or set(value) <= {"text"}:
        return None
    return "this server answers in text only: modalities other than 'text' are not supported"


def _service_tier(value: Any) -> str | None:
    if value in (None, "auto", "default"):
        return None
    return (
        f"service_tier {value!r} is not offered here; every request gets the one tier, "
        "set its priority with the X-Kensho-Priority header instead"
    )


def _store(value: Any) -> str | None:
    return "stored completions are not kept by this server (store)" if value else None


def _metadata(value: Any) -> str | None:
    if not value:
        return None
    return "metadata is kept with stored completions only, which this server does not keep"


def _suffix(value: Any) -> str | None:
    return "insertion (suffix) is not supported: send the prompt only" if value else None


def _obfuscation(options: Any) -> str | None:
    if options is None or not getattr(options, "include_obfuscation", None):
        return None
    return "stream obfuscation is not supported (stream_options.include_obfuscation)"


_COMMON_RULES: dict[str, _Rule] = {
    "service_tier": _service_tier,
    "stream_options": _obfuscation,
}

_CHAT_RULES: dict[str, _Rule] = {
    **_COMMON_RULES,
    "audio": _unless_none("audio output is not supported: this server answers in text"),
    "modalities": _modalities,
    "prediction": _unless_none("predicted outputs (prediction) are not supported"),
    "web_search_options": _unless_none("web search is not available: this server is offline"),
    "reasoning_effort": _unless_none(
        "reasoning_effort is not supported: the served model has no reasoning budget"
    ),
    "verbosity": _unless_none("verbosity is not supported by the served model"),
    "store": _store,
    "metadata": _metadata,
}

_COMPLETION_RULES: dict[str, _Rule] = {**_COMMON_RULES, "suffix": _suffix}


def _refuse_unknown(body: BaseModel) -> None:
    """A field no OpenAI schema defines: refused, with OpenAI's own message.

    Structured output and tools are declared in the schemas and honoured by
    ``_tools.py``, so they never arrive here as extras.
    """
    name = next(iter(body.model_extra or {}), None)
    if name is not None:
        raise APIError(
            400,
            f"Unrecognized request argument supplied: {name}",
            code="unknown_parameter",
            param=name,
        )


def _apply(body: BaseModel, rules: dict[str, _Rule]) -> None:
    for name, rule in rules.items():
        reason = rule(getattr(body, name, None))
        if reason is not None:
            raise APIError(400, reason, code="unsupported_parameter", param=name)


def _stream_options(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400,
            "stream_options is only allowed when stream is true",
            code="invalid_value",
            param="stream_options",
        )


def require_features(wanted: Iterable[tuple[str, Feature]], available: frozenset[Feature]) -> None:
    """Refuse the first ``(field, feature)`` whose feature the engines do not declare."""
    for name, feature in wanted:
        if feature not in available:
            raise APIError(
                400,
                f"{name} is not supported by the engines serving this model "
                f"(they cannot honour {feature})",
                code="unsupported_parameter",
                param=name,
            )


def _sampling_needs(body: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, Feature]]:
    needs: list[tuple[str, Feature]] = []
    if body.frequency_penalty:
        needs.append(("frequency_penalty", "penalties"))
    if body.presence_penalty:
        needs.append(("presence_penalty", "penalties"))
    if body.logit_bias:
        needs.append(("logit_bias", "logit_bias"))
    return needs


def audit_chat(body: ChatCompletionRequest, available: frozenset[Feature]) -> None:
    """Refuse (400) the first field of a chat request that would not be honoured."""
    _refuse_unknown(body)
    _apply(body, _CHAT_RULES)
    _stream_options(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(
            400,
            "top_logprobs needs logprobs set to true",
            code="invalid_value",
            param="top_logprobs",
        )
    needs = _sampling_needs(body)
    if body.logprobs:
        needs.insert(0, ("logprobs", "logprobs"))
    require_features(needs, available)


def audit_completion(body: CompletionRequest, available: frozenset[Feature]) -> None:
    """Refuse (400) the first field of a text completion that would not be honoured."""
    _refuse_unknown(body)
    _apply(body, _COMPLETION_RULES)
    _stream_options(body)
    if body.echo and body.logprobs is not None:
        raise APIError(
            400,
            "echo together with logprobs (the prompt's logprobs) is not supported; "
            "ask for one of them",
            code="unsupported_parameter",
            param="echo",
        )
    needs = _sampling_needs(body)
    if body.logprobs is not None:
        needs.insert(0, ("logprobs", "logprobs"))
    require_features(needs, available)


def audit_embedding(body: EmbeddingRequest, available: frozenset[Feature]) -> None:
    """Refuse (400) an embedding request the served model cannot answer as asked."""
    _refuse_unknown(body)
    if "embeddings" not in available:
        raise APIError(
            400,
            f"model {body.model!r} is served by engines that cannot make embeddings",
            code="unsupported_model",
            param="model",
        )
    if body.dimensions is not None:
        raise APIError(
            400,
            "dimensions is not supported: the served model's embeddings have one fixed "
            "size (its hidden size); omit dimensions",
            code="unsupported_parameter",
            param="dimensions",
        )
