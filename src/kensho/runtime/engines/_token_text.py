"""Token ids as the text and exact bytes that ``logprobs`` report.

A byte-level BPE token (GPT-2, Llama 3, the demo model) may hold part of a UTF-8
character: decoding it alone gives U+FFFD, so OpenAI reports each token's ``bytes``
as well. Here the bytes come from the token's own vocabulary entry (the byte-level
alphabet mapped back to bytes, or SentencePiece's ``<0xNN>`` byte fallback), and from
the decoded text for everything else.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["TokenText"]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, mapped back to the bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenText:
    """``(text, bytes)`` of single token ids for one tokenizer, cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        # Only a byte-level decoder spells bytes with the GPT-2 alphabet; elsewhere a
        # vocabulary entry like "é" is the character itself.
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = "ByteLevel" in repr(decoder)

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._bytes(token_id)
            cached = (raw.decode("utf-8", errors="replace"), raw)
            self._cache[token_id] = cached
        return cached

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece:
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            alphabet = _byte_level_alphabet()
            byte_level = self._byte_level and token_id not in self._special
            if byte_level and all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        return str(self._tokenizer.decode([token_id])).encode("utf-8")
