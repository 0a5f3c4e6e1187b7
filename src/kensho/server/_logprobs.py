"""Engine logprobs in OpenAI's two shapes: chat's ``content`` list, completions' columns.

Chat (``logprobs: true``, ``top_logprobs: k``)::

    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
    "bytes"}, ... k]}], "refusal": null}

Completions (``logprobs: k``), where each ``top_logprobs`` entry holds the ``k`` most
likely tokens *and* the sampled one, as OpenAI documents ("up to logprobs+1")::

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}],
     "text_offset": [...]}

``text_offset`` counts characters from the start of the returned text, carried on
across the chunks of a stream by :class:`TextOffsets`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kensho.runtime.engines.base import TokenLogprob

__all__ = ["TextOffsets", "chat_logprobs", "text_logprobs"]


def _top(token: str, logprob: float, raw: bytes) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    """The chat ``choices[].logprobs`` object (whole answer or one delta)."""
    content = [
        {
            **_top(e.token, e.logprob, e.token_bytes),
            "top_logprobs": [_top(t, lp, raw) for t, lp, raw in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


class TextOffsets:
    """Where each next token starts in the returned text (``start``: echoed prompt)."""

    def __init__(self, start: int = 0) -> None:
        self.position = start

    def take(self, token: str) -> int:
        offset = self.position
        self.position += len(token)
        return offset


def text_logprobs(entries: Iterable[TokenLogprob], offsets: TextOffsets) -> dict[str, Any]:
    """The completions ``choices[].logprobs`` object (whole answer or one chunk)."""
    items = list(entries)
    return {
        "tokens": [e.token for e in items],
        "token_logprobs": [e.logprob for e in items],
        "top_logprobs": [{**{t: lp for t, lp, _ in e.top}, e.token: e.logprob} for e in items],
        "text_offset": [offsets.take(e.token) for e in items],
    }
