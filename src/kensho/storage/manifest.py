"""Manifest schema v1: strict validation and canonical bytes.

A manifest is an envelope ``{"signed": {...}, "signatures": [...]}``. Everything that
matters lives in ``signed``; ``signatures`` sign :func:`canonical_bytes` of it (the
signing itself comes with delta updates). The full schema is in ``docs/manifest.md``.

Why so strict: a manifest tells Kensho where to write on the user's disk, so it is
hostile input until proven otherwise. Every rule below fails with a
:class:`ManifestError` whose ``field`` names the culprit (``files[3].path``), and
nothing is written before the whole document validated. Unknown keys are errors too:
a typo (``requierd``) must never silently turn a required file into an optional one;
new fields come with a new ``schema`` number.

Why canonical bytes come from the *received* ``signed`` object rather than from our
parsed dataclasses: a signature must cover exactly what the publisher signed. If we
re-serialised our own view (with defaults filled in), any field we do not model would
change the bytes. Floats are forbidden anywhere in ``signed`` for the same reason:
their text form is not canonical across languages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from kensho.errors import ManifestError
from kensho.storage._paths import MAX_PATH_BYTES, RESERVED_DIR, path_problem

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNKS",
    "MAX_CHUNKS_PER_FILE",
    "MAX_FILES",
    "MAX_FILE_SIZE",
    "MAX_MANIFEST_BYTES",
    "MIN_CHUNK_SIZE",
    "RESERVED_DIR",
    "SCHEMA_VERSION",
    "Chunk",
    "FileEntry",
    "Manifest",
    "Signature",
    "canonical_bytes",
    "dump_manifest",
    "load_manifest",
    "parse_manifest",
]

SCHEMA_VERSION = 1
#: 4 MiB: the measured knee of parallel SHA-256 throughput (docs/manifest.md).
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_FILE_SIZE = 1 << 40  # 1 TiB: larger than any model file, small enough to be sane
MAX_FILES = 100_000
#: Chunks in one manifest, all files together (and so in one file). Every chunk costs
#: memory and bookkeeping whatever its size: 262,144 is 1 TiB at 4 MiB chunks and
#: keeps the worst manifest near 150 MiB of RAM (docs/manifest.md, "Limits").
MAX_CHUNKS = 1 << 18
MAX_CHUNKS_PER_FILE = MAX_CHUNKS
#: Every chunk but a file's last has at least this many bytes: the smallest minimum
#: ``manifest build --cdc-min`` accepts. A 1-byte chunk is an attack, not a use case.
MIN_CHUNK_SIZE = 64
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_TEXT = 64 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A byte range of a file and the SHA-256 of those bytes."""

    offset: int
    size: int
    sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file the application needs. ``chunks`` tile ``[0, size)`` exactly."""

    path: str
    size: int
    sha256: str
    version: str
    changelog: str
    required: bool
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature over :func:`canonical_bytes` of ``signed`` (checked in issue 4)."""

    keyid: str
    sig: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest. ``raw_signed`` is the ``signed`` object as received."""

    schema: int
    name: str
    version: str
    serial: int
    created: str
    expires: str | None
    min_client_version: str | None
    files: tuple[FileEntry, ...]
    signatures: tuple[Signature, ...] = ()
    raw_signed: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _by_path: Mapping[str, FileEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lookups by path happen per file in plans and repairs: O(1), not a scan.
        object.__setattr__(self, "_by_path", {f.path: f for f in self.files})

    def canonical_bytes(self) -> bytes:
        """The bytes a signature covers (see :func:`canonical_bytes`)."""
        return canonical_bytes(self.raw_signed)

    def file(self, path: str) -> FileEntry | None:
        """The entry for ``path``, or ``None``."""
        return self._by_path.get(path)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def canonical_bytes(signed: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, no ASCII escaping.

    Deterministic because ``signed`` holds only objects, arrays, strings, integers,
    booleans and null (floats are rejected by validation), and keys are sorted by
    code point. Control characters in strings are escaped as ``\\u00XX``.
    """
    return json.dumps(
        signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def dump_manifest(manifest: Manifest) -> bytes:
    """The manifest envelope as pretty JSON (2-space indent, sorted keys, newline)."""
    doc = {
        "signed": manifest.raw_signed,
        "signatures": [{"keyid": s.keyid, "sig": s.sig} for s in manifest.signatures],
    }
    # orjson writes the same bytes as json.dumps(sort_keys=True, indent=2,
    # ensure_ascii=False), in C: json's indenting encoder is pure Python and holds
    # every token in a list (800 MiB and 5 s for a 60 MiB manifest).
    options = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    return orjson.dumps(doc, default=_plain, option=options) + b"\n"


def _plain(value: object) -> dict[str, Any]:
    """A mapping orjson does not know (a ``MappingProxyType``) as a dict."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} cannot be written into a manifest")


def load_manifest(path: Path) -> Manifest:
    """Read and validate the manifest at ``path``."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(
            f"manifest file {path} does not exist; pass --manifest or set storage.manifest"
        ) from None
    except OSError as exc:
        raise ManifestError(f"manifest file {path} cannot be read: {exc.strerror}") from exc
    try:
        return parse_manifest(data)
    except ManifestError as exc:
        error = ManifestError(f"manifest {path}: {exc}")
        error.field = exc.field
        raise error from None


# --- parsing ---------------------------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # in C: this runs once per chunk object
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # Two values for one key: which one a signer saw is ambiguous.
                raise ManifestError(f"duplicate key {key!r} in a JSON object")
            seen.add(key)
    return result


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"{name} is not valid JSON")


def _decode(data: bytes | str) -> tuple[Any, bool]:
    """The decoded document, and whether it holds any float (worth a walk to name it)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    floats: list[str] = []

    def parse_float(text: str) -> float:
        floats.append(text)
        return float(text)

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        doc = json.loads(
            text,
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=parse_float,
        )
        return doc, bool(floats)
    except ManifestError:
        raise
    except RecursionError:
        raise ManifestError("the manifest is nested too deeply to be a manifest") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise ManifestError(f"the manifest is not valid UTF-8 JSON: {exc}") from None


def parse_manifest(data: bytes | str | Mapping[str, Any]) -> Manifest:
    """Validate a manifest given as JSON text or an already-decoded mapping.

    Raises :class:`ManifestError` naming the first offending field; never anything else.
    """
    # Decoded text says whether it held a float; a mapping from a caller is walked.
    doc, floats = _decode(data) if isinstance(data, bytes | str) else (data, True)
    try:
        return _Validator(check_floats=floats).manifest(doc)
    except RecursionError:
        raise ManifestError("the manifest is nested too deeply to be a manifest") from None


class _Validator:
    """Walks a decoded document; each method validates one level and names fields."""

    def __init__(self, *, check_floats: bool = True) -> None:
        self.chunks_seen = 0
        self.check_floats = check_floats

    def _count_chunks(self, count: int, where: str) -> None:
        """Refuse, before reading them, chunks past :data:`MAX_CHUNKS` in all."""
        self.chunks_seen += count
        if self.chunks_seen > MAX_CHUNKS:
            raise ManifestError(
                f"the manifest lists more than {MAX_CHUNKS} chunks in all (this file brings "
                f"it to {self.chunks_seen}); rebuild it with larger chunks (manifest build "
                "--cdc-avg or --chunk-size) or split the store",
                field=where,
            )

    def manifest(self, doc: object) -> Manifest:
        obj = self._object(doc, "", required={"signed", "signatures"}, optional=set())
        signed = self._object(
            obj["signed"],
            "signed",
            required={"schema", "name", "version", "serial", "created", "files"},
            optional={"expires", "min_client_version"},
        )
        if self.check_floats:  # a walk of every value: skipped when none was decoded
            self._no_floats(signed, "signed")
        schema = self._int(signed["schema"], "signed.schema", 0, 1 << 31)
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"unsupported schema {schema}; this Kensho reads schema {SCHEMA_VERSION} "
                "(upgrade Kensho to read newer manifests)",
                field="signed.schema",
            )
        name = self._text(signed["name"], "signed.name", 1, 256)
        version = self._text(signed["version"], "signed.version", 1, 128)
        serial = self._int(signed["serial"], "signed.serial", 0, (1 << 63) - 1)
        created = self._timestamp(signed["created"], "signed.created")
        expires = None
        if signed.get("expires") is not None:
            expires = self._timestamp(signed["expires"], "signed.expires")
            if _parse_ts(expires) <= _parse_ts(created):
                raise ManifestError("must be later than signed.created", field="signed.expires")
        mcv = None
        if signed.get("min_client_version") is not None:
            mcv = self._text(signed["min_client_version"], "signed.min_client_version", 1, 128)
        files = self._files(signed["files"], version)
        signatures = self._signatures(obj["signatures"])
        return Manifest(
            schema=schema,
            name=name,
            version=version,
            serial=serial,
            created=created,
            expires=expires,
            min_client_version=mcv,
            files=files,
            signatures=signatures,
            raw_signed=signed,
        )

    # -- files -------------------------------------------------------------------------

    def _files(self, value: object, default_version: str) -> tuple[FileEntry, ...]:
        if not isinstance(value, list):
            raise ManifestError(f"must be a list, got {_kind(value)}", field="signed.files")
        if len(value) > MAX_FILES:
            raise ManifestError(f"more than {MAX_FILES} files", field="signed.files")
        entries: list[FileEntry] = []
        seen: dict[str, int] = {}
        folded: dict[str, int] = {}
        for i, item in enumerate(value):
            where = f"files[{i}]"
            entry = self._file(item, where, default_version)
            if entry.path in seen:
                raise ManifestError(
                    f"duplicate path {entry.path!r} (also files[{seen[entry.path]}])",
                    field=f"{where}.path",
                )
            key = entry.path.casefold()
            if key in folded:
                raise ManifestError(
                    f"{entry.path!r} differs only by case from files[{folded[key]}]; "
                    "they would collide on case-insensitive file systems",
                    field=f"{where}.path",
                )
            seen[entry.path] = i
            folded[key] = i
            entries.append(entry)
        # A path that is also a folder of another path cannot exist on any file system.
        for i, entry in enumerate(entries):
            parts = entry.path.split("/")
            for depth in range(1, len(parts)):
                prefix = "/".join(parts[:depth])
                if prefix in seen:
                    raise ManifestError(
                        f"{entry.path!r} needs {prefix!r} to be a folder, but "
                        f"files[{seen[prefix]}] declares it as a file",
                        field=f"files[{i}].path",
                    )
        return tuple(entries)

    def _file(self, value: object, where: str, default_version: str) -> FileEntry:
        obj = self._object(
            value,
            where,
            required={"path", "size", "sha256"},
            optional={"version", "changelog", "required", "chunks"},
        )
        path = self._path(obj["path"], f"{where}.path")
        size = self._int(obj["size"], f"{where}.size", 0, MAX_FILE_SIZE)
        sha = self._hex(obj["sha256"], f"{where}.sha256")
        version = default_version
        if "version" in obj:
            version = self._text(obj["version"], f"{where}.version", 1, 128)
        changelog = ""
        if "changelog" in obj:
            changelog = self._text(obj["changelog"], f"{where}.changelog", 0, MAX_TEXT)
        required = True
        if "required" in obj:
            if not isinstance(obj["required"], bool):
                raise ManifestError(
                    f"must be true or false, got {_kind(obj['required'])}",
                    field=f"{where}.required",
                )
            required = obj["required"]
        if "chunks" in obj:
            chunks = self._chunks(obj["chunks"], where, size, sha)
        else:
            self._count_chunks(1, f"{where}.size")
            chunks = (Chunk(0, size, sha),)
        return FileEntry(path, size, sha, version, changelog, required, chunks)

    def _chunks(self, value: object, where: str, size: int, sha: str) -> tuple[Chunk, ...]:
        if not isinstance(value, list):
            raise ManifestError(f"must be a list, got {_kind(value)}", field=f"{where}.chunks")
        self._count_chunks(len(value), f"{where}.chunks")
        chunks: list[Chunk] = []
        expected = 0
        for j, item in enumerate(value):
            fast = _well_formed_chunk(item, expected, size)
            if fast is not None:
                chunks.append(fast)
                expected = fast.end
                continue
            cw = f"{where}.chunks[{j}]"  # the slow path names what is wrong
            obj = self._object(item, cw, required={"offset", "size", "sha256"}, optional=set())
            offset = self._int(obj["offset"], f"{cw}.offset", 0, MAX_FILE_SIZE)
            csize = self._int(obj["size"], f"{cw}.size", 1, MAX_FILE_SIZE)
            if offset != expected:
                raise ManifestError(
                    f"chunks must tile the file in order without gaps or overlaps: "
                    f"expected offset {expected}, got {offset}",
                    field=f"{cw}.offset",
                )
            if offset + csize > size:
                raise ManifestError(
                    f"chunk ends at byte {offset + csize}, past the file size {size}",
                    field=f"{cw}.size",
                )
            if csize < MIN_CHUNK_SIZE and offset + csize != size:
                raise ManifestError(
                    f"must be at least {MIN_CHUNK_SIZE} bytes, got {csize}: only a file's "
                    "last chunk may be smaller (rebuild the manifest with larger chunks)",
                    field=f"{cw}.size",
                )
            chunks.append(Chunk(offset, csize, self._hex(obj["sha256"], f"{cw}.sha256")))
            expected = offset + csize
        if expected != size:
            raise ManifestError(
                f"chunks cover {expected} bytes but the file has {size}; they must tile it exactly",
                field=f"{where}.chunks",
            )
        if len(chunks) == 1 and chunks[0].sha256 != sha:
            raise ManifestError(
                "a single chunk covers the whole file, so its sha256 must equal the file's",
                field=f"{where}.chunks[0].sha256",
            )
        return tuple(chunks)

    # -- scalars -----------------------------------------------------------------------

    @staticmethod
    def _object(
        value: object, where: str, *, required: set[str], optional: set[str]
    ) -> dict[str, Any]:
        label = where or "manifest"
        if not isinstance(value, dict):
            raise ManifestError(f"must be an object, got {_kind(value)}", field=label)
        for key in value:
            if key not in required and key not in optional:
                raise ManifestError(
                    f"unknown key {key!r} (allowed: {', '.join(sorted(required | optional))})",
                    field=label,
                )
        for key in sorted(required):
            if key not in value:
                raise ManifestError(f"missing required key {key!r}", field=label)
        return value

    @staticmethod
    def _int(value: object, where: str, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ManifestError(f"must be an integer, got {_kind(value)}", field=where)
        if not low <= value <= high:
            raise ManifestError(f"must be between {low} and {high}, got {value}", field=where)
        return value

    @staticmethod
    def _text(value: object, where: str, low: int, high: int) -> str:
        if not isinstance(value, str):
            raise ManifestError(f"must be a string, got {_kind(value)}", field=where)
        if not low <= len(value) <= high:
            raise ManifestError(f"must be {low} to {high} characters long", field=where)
        if "\x00" in value:
            raise ManifestError("must not contain NUL", field=where)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ManifestError("must be valid Unicode (no lone surrogates)", field=where) from None
        return value

    @staticmethod
    def _hex(value: object, where: str) -> str:
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            shown = value if isinstance(value, str) else _kind(value)
            raise ManifestError(
                f"must be 64 lower-case hex digits (a SHA-256), got {str(shown)[:80]!r}",
                field=where,
            )
        return value

    def _timestamp(self, value: object, where: str) -> str:
        text = self._text(value, where, 1, 64)
        if not _TIMESTAMP.fullmatch(text):
            raise ManifestError(
                f"must be an RFC 3339 UTC time like 2026-11-25T10:00:00Z, got {text!r}",
                field=where,
            )
        try:
            _parse_ts(text)
        except ValueError:
            raise ManifestError(f"is not a real date and time: {text!r}", field=where) from None
        return text

    def _path(self, value: object, where: str) -> str:
        path = self._text(value, where, 1, MAX_PATH_BYTES)
        problem = path_problem(path)
        if problem:
            raise ManifestError(f"{problem}, got {path[:200]!r}", field=where)
        return path

    def _signatures(self, value: object) -> tuple[Signature, ...]:
        if not isinstance(value, list):
            raise ManifestError(f"must be a list, got {_kind(value)}", field="signatures")
        if len(value) > 256:
            raise ManifestError("more than 256 signatures", field="signatures")
        sigs: list[Signature] = []
        for i, item in enumerate(value):
            where = f"signatures[{i}]"
            obj = self._object(item, where, required={"keyid", "sig"}, optional=set())
            keyid = self._text(obj["keyid"], f"{where}.keyid", 1, 256)
            sig = self._text(obj["sig"], f"{where}.sig", 1, 4096)
            sigs.append(Signature(keyid, sig))
        return tuple(sigs)

    def _no_floats(self, value: object, where: str) -> None:
        if isinstance(value, float):
            raise ManifestError("floats are not allowed in signed data", field=where)
        if isinstance(value, dict):
            for key, item in value.items():
                self._no_floats(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self._no_floats(item, f"{where}[{i}]")


_CHUNK_KEYS = frozenset({"offset", "size", "sha256"})


def _well_formed_chunk(item: object, offset: int, file_size: int) -> Chunk | None:
    """The chunk at ``offset`` if ``item`` passes every chunk rule, else ``None``.

    Why: most manifests are well formed, and the full checks cost microseconds per
    chunk (field names, messages); this does the same tests in a few type checks.
    ``None`` sends the item through those full checks, which say what is wrong.
    """
    if type(item) is not dict or item.keys() != _CHUNK_KEYS:
        return None
    start, size, sha = item["offset"], item["size"], item["sha256"]
    if type(start) is not int or type(size) is not int or type(sha) is not str:
        return None
    end = start + size
    if start != offset or size < 1 or end > file_size or not _HEX64.fullmatch(sha):
        return None
    if size < MIN_CHUNK_SIZE and end != file_size:
        return None
    return Chunk(start, size, sha)


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    return names.get(type(value), type(value).__name__)
