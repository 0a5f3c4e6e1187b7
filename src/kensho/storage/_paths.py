"""What a path in a manifest may be: relative POSIX, inside the root, unambiguous.

Kept apart from the manifest's schema validation because the rules are about file
systems (drive letters, NFC, invisible characters, Kensho's own folder), not JSON.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

__all__ = ["MAX_PATH_BYTES", "MAX_SEGMENT_BYTES", "RESERVED_DIR", "path_problem"]

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
#: Kensho's own folder under the root; no manifest path may point into it.
RESERVED_DIR = ".kensho"

_DRIVE = re.compile(r"[A-Za-z]:")


def _segment_problem(seg: str) -> str | None:
    if seg == "":
        return "must not contain empty segments ('//' or a trailing '/')"
    if seg in {".", ".."}:
        return "must not contain '.' or '..' segments"
    if len(seg.encode("utf-8")) > MAX_SEGMENT_BYTES:
        return f"each segment must be at most {MAX_SEGMENT_BYTES} bytes"
    return None


#: Unicode categories refused in paths: Cc (C0, DEL and C1 controls such as U+009B CSI
#: and U+0085 NEL), Cf (format: bidi overrides that make a name display as another,
#: zero-width characters that HFS+ ignores in names, so ``.ken\u200csho`` would be
#: ``.kensho`` there), Zl and Zp (U+2028, U+2029: line breaks to a terminal or a log).
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _has_invisible(path: str) -> bool:
    """Whether ``path`` holds a character of a category in ``_INVISIBLE`` (see there)."""
    if path.isascii():  # the common case, without a category lookup per character
        return any(ord(c) < 32 or ord(c) == 127 for c in path)
    return any(unicodedata.category(c) in _INVISIBLE for c in path)


#: Whole-path rules, in the order they are checked: (is broken, what the rule says).
_PATH_RULES: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda p: len(p.encode("utf-8")) > MAX_PATH_BYTES, f"must be at most {MAX_PATH_BYTES} bytes"),
    (lambda p: p.startswith("/"), "must be relative to the store root, not absolute"),
    (lambda p: "\\" in p, "must use '/' as separator; backslashes are not allowed"),
    (
        _has_invisible,
        "must not contain NUL, control characters (C0, DEL, C1), invisible format "
        "characters (bidi overrides, zero-width) or line/paragraph separators",
    ),
    (lambda p: _DRIVE.match(p) is not None, "must not start with a drive letter"),
    (
        lambda p: not unicodedata.is_normalized("NFC", p),
        "must be in Unicode NFC form (macOS and Linux would disagree otherwise)",
    ),
)


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative POSIX path inside the root, or ``None``."""
    for broken, rule in _PATH_RULES:
        if broken(path):
            return rule
    segments = path.split("/")
    for seg in segments:
        problem = _segment_problem(seg)
        if problem:
            return problem
    if segments[0].casefold() == RESERVED_DIR:
        return f"must not point into {RESERVED_DIR}/, Kensho's own state folder"
    return None
