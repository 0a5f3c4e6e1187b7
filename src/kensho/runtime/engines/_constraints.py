"""Constrained decoding with llguidance, for engines that run their own sampling loop.

A request's response format and tools become one llguidance grammar (Lark syntax,
with ``%json`` for each JSON schema); a :class:`Guide` then masks, at every step, the
tokens that would leave the grammar, so the output parses and validates whatever the
model — the tiny demo model included — would rather have written. llguidance is made
for this (it is what vLLM, SGLang and llama.cpp use): its masks cost well under a
millisecond per token, and it reports the schema keywords it cannot enforce, which
become a 400 naming them instead of an output that silently ignores them.

JSON is compiled with fixed separators (``", "`` and ``": "``) and no free
whitespace: a small model given the freedom to write whitespace writes little else.

The grammar, by request::

    start: answer            response format only, or tool_choice "none"
    start: calls             tool_choice "required" or a named function
    start: answer | calls    tool_choice "auto" (text or JSON, or calls)

where ``answer`` is the response format's JSON or any text that does not begin a call.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kensho.errors import EngineError, InvalidRequestError
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.structured import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_CALL_SEPARATOR,
    NamedTool,
    ToolSpec,
    tool_call_prefix,
)

__all__ = [
    "JSON_OPTIONS",
    "ConstraintCompiler",
    "Guide",
    "check_schemas",
    "grammar_for",
    "text_not_starting",
]

JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_CACHED_GRAMMARS = 64  # compiled grammars kept per model (least recently used dropped)


def _lark_string(text: str) -> str:
    """A Lark string literal for ``text`` (JSON string escapes are Lark's too)."""
    return json.dumps(text, ensure_ascii=False)


def _regex_char(char: str) -> str:
    """``char`` as a regex atom that means itself, inside or outside a class."""
    return f"\\x{{{ord(char):x}}}"


def text_not_starting(prefix: str) -> str:
    """A regex for any text (possibly empty) that does not begin with ``prefix``.

    Rust's regex has no look-ahead, so spell it out: a proper prefix of ``prefix``, or
    its first ``i`` characters followed by anything but the next one, then anything.
    """
    proper = ["".join(_regex_char(c) for c in prefix[:i]) for i in range(len(prefix))]
    diverging = [
        "".join(_regex_char(c) for c in prefix[:i]) + f"[^{_regex_char(prefix[i])}](?s:.*)"
        for i in range(len(prefix))
    ]
    return "(?:" + "|".join(proper + diverging) + ")"


def _json_grammar(schema: Mapping[str, Any]) -> str:
    """``%json`` of ``schema`` with Kensho's compile options (the client's are replaced)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _check(schema: Mapping[str, Any], param: str) -> None:
    """Refuse a schema llguidance cannot enforce, naming the field and its keyword."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_lark("start: " + _json_grammar(schema))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{param}: not a JSON schema: {exc}", param=param) from exc
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequestError(
            f"{param}: this schema cannot be enforced by constrained decoding: "
            f"{messages[0] if messages else 'invalid schema'}",
            param=param,
        )


def _tool_rule(index: int, tool: ToolSpec) -> str:
    prefix = _lark_string(tool_call_prefix(tool.name))
    suffix = _lark_string("}" + TOOL_CALL_CLOSE)
    return f"call_{index}: {prefix} {_json_grammar(tool.parameters)} {suffix}"


def _tool_rules(request: GenerationRequest) -> list[str]:
    choice = request.tool_choice
    tools = [
        (i, tool)
        for i, tool in enumerate(request.tools)
        if not isinstance(choice, NamedTool) or tool.name == choice.name
    ]
    if not tools:
        raise InvalidRequestError(
            f"tool_choice names a function that is not in tools: {choice}", param="tool_choice"
        )
    separator = _lark_string(TOOL_CALL_SEPARATOR)
    repeat = f" ({separator} call)*" if request.parallel_tool_calls else ""
    return [
        f"calls: call{repeat}",
        "call: " + " | ".join(f"call_{i}" for i, _ in tools),
        *(_tool_rule(i, tool) for i, tool in tools),
    ]


def check_schemas(request: GenerationRequest) -> None:
    """Check every schema of ``request`` on its own, so that a keyword llguidance cannot
    enforce is reported against the field that holds it (``response_format`` or
    ``tools[i].function.parameters``) rather than against the combined grammar."""
    if request.response_format is not None:
        _check(request.response_format.schema or _ANY_OBJECT, "response_format")
    if request.tool_choice != "none":
        for i, tool in enumerate(request.tools):
            _check(tool.parameters, f"tools[{i}].function.parameters")


def grammar_for(request: GenerationRequest) -> str | None:
    """The Lark grammar ``request``'s output must match, or ``None`` when it is free."""
    if not request.constrained:
        return None
    fmt = request.response_format
    calling = bool(request.tools) and request.tool_choice != "none"
    answer = (
        _json_grammar(fmt.schema or _ANY_OBJECT)
        if fmt is not None
        else f"/{text_not_starting(TOOL_CALL_OPEN.strip())}/"
    )
    if not calling:
        return f"start: {_json_grammar(fmt.schema or _ANY_OBJECT)}" if fmt else None
    if request.tool_choice != "auto":
        return "\n".join(["start: calls", *_tool_rules(request)])
    return "\n".join(["start: answer | calls", f"answer: {answer}", *_tool_rules(request)])


class Guide:
    """One request's grammar state: masks the logits, follows the sampled tokens.

    :meth:`fill` (the grammar's work, on the CPU, GIL released) and :meth:`apply` (on
    the logits' device) are separate so that the engine can compute the mask while the
    forward pass is still running on a GPU: the next step's mask depends only on the
    tokens already sampled.
    """

    def __init__(self, matcher: Any, vocab_size: int, *, pinned: bool = False) -> None:
        import torch

        self._matcher = matcher
        self._vocab = vocab_size
        words = (vocab_size + 31) // 32
        self._bitmask = torch.full((words,), -1, dtype=torch.int32, pin_memory=pinned)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow."""
        return bool(self._matcher.is_stopped())

    def fill(self) -> None:
        """Compute which tokens the grammar allows next (one bit per token)."""
        mask = self._bitmask
        self._matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if self._matcher.is_error():
            raise EngineError(f"constrained decoding failed: {self._matcher.get_error()}")

    def apply(self, logits: Any) -> Any:
        """``logits`` (``[1, vocab]``) with every token the last :meth:`fill` forbade at -inf.

        The bits are unpacked by numpy on the CPU (one vectorised call, cheaper than
        the handful of small torch ops it replaces) and sent over as one bool vector.
        """
        import numpy as np
        import torch

        vocab = logits.shape[-1]
        words = self._bitmask.numpy().view(np.uint8)
        forbidden = np.unpackbits(~words, count=min(vocab, words.size * 8), bitorder="little")
        if forbidden.size < vocab:  # ids past the tokenizer's vocabulary: never
            forbidden = np.pad(forbidden, (0, vocab - forbidden.size), constant_values=1)
        mask = torch.from_numpy(forbidden.view(np.bool_))
        return logits.masked_fill(mask.to(logits.device, non_blocking=True), float("-inf"))

    def advance(self, token_ids: Sequence[int]) -> None:
        """Follow tokens that were sampled (or produced earlier, for a continuation)."""
        if token_ids and not self._matcher.consume_tokens(list(token_ids)):
            raise EngineError(
                f"constrained decoding lost its grammar state: {self._matcher.get_error()}"
            )


class ConstraintCompiler:
    """Builds :class:`Guide` s for one loaded model (its tokenizer and vocabulary).

    The llguidance tokenizer takes about a second to build for a large vocabulary,
    so it is built once, on the first constrained request, not at every load.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab = vocab_size
        self._eos = sorted(eos_ids)
        self._ll_tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # grammar -> pristine matcher
        self._lock = threading.Lock()

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = _ll_tokenizer(self._hf_tokenizer, self._vocab, self._eos)
            return self._ll_tokenizer

    def guide(self, request: GenerationRequest, *, pinned: bool = False) -> Guide | None:
        """The guide for ``request``, or ``None`` when its output is unconstrained."""
        grammar = grammar_for(request)
        if grammar is None:
            return None
        return Guide(self._matcher(grammar, request), self._vocab, pinned=pinned)

    def _matcher(self, grammar: str, request: GenerationRequest) -> Any:
        """A fresh matcher for ``grammar``: a copy of a cached pristine one when possible.

        Compiling a schema costs milliseconds (tens for a large one), copying a compiled
        matcher microseconds, and applications send the same schema again and again.
        """
        with self._lock:
            pristine = self._compiled.get(grammar)
            if pristine is not None:
                self._compiled.move_to_end(grammar)
                return pristine.deep_copy()
        from llguidance import LLMatcher

        check_schemas(request)
        matcher = LLMatcher(self._tokenizer(), LLMatcher.grammar_from_lark(grammar), log_level=0)
        if matcher.is_error():
            param = "tools" if request.tools else "response_format"
            raise InvalidRequestError(
                f"{param}: cannot be enforced by constrained decoding: {matcher.get_error()}",
                param=param,
            )
        with self._lock:
            self._compiled[grammar] = matcher.deep_copy()
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher


def _ll_tokenizer(hf_tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    try:
        import llguidance.hf
    except ImportError as exc:
        raise InvalidRequestError(
            "structured output needs llguidance, which is not installed; "
            "install it with: pip install 'kensho[ml]'",
            param="response_format",
        ) from exc
    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)
    except ValueError as exc:  # a slow (Python) tokenizer: llguidance needs a fast one
        raise InvalidRequestError(
            f"structured output is not available with this model's tokenizer: {exc}",
            param="response_format",
        ) from exc
