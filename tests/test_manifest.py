"""Manifest schema v1: validation rules (one case per rule), canonical bytes, build."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _storage_support import kensho, sha, signed_for, write_tree
from kensho.errors import ManifestError
from kensho.storage import (
    DEFAULT_CHUNK_SIZE,
    build_manifest,
    canonical_bytes,
    dump_manifest,
    load_manifest,
    parse_manifest,
)

FILES = {"a/one.bin": b"x" * 10_000, "b.txt": b"hello", "empty": b""}


def doc() -> dict[str, Any]:
    return {"signed": signed_for(FILES, 4096), "signatures": []}


def test_valid_manifest_parses_with_defaults() -> None:
    d = doc()
    del d["signed"]["files"][1]["chunks"]
    del d["signed"]["files"][1]["required"]
    del d["signed"]["files"][1]["version"]
    m = parse_manifest(json.dumps(d))
    assert [f.path for f in m.files] == ["a/one.bin", "b.txt", "empty"]
    big = m.files[0]
    assert [(c.offset, c.size) for c in big.chunks] == [(0, 4096), (4096, 4096), (8192, 1808)]
    b = m.files[1]
    assert b.required is True and b.version == "1.0.0" and len(b.chunks) == 1
    assert b.chunks[0].sha256 == sha(b"hello")
    assert m.files[2].chunks == ()


def test_canonical_bytes_are_sorted_compact_utf8() -> None:
    signed = {"b": 1, "a": ["é", {"z": None, "y": True}]}
    assert canonical_bytes(signed) == '{"a":["é",{"y":true,"z":null}],"b":1}'.encode()


def test_canonical_bytes_ignore_key_order_and_whitespace() -> None:
    d = doc()
    shuffled = {"signatures": [], "signed": dict(reversed(list(d["signed"].items())))}
    a = parse_manifest(json.dumps(d, indent=4))
    b = parse_manifest(json.dumps(shuffled))
    assert a.canonical_bytes() == b.canonical_bytes()


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    m = parse_manifest(doc())
    (tmp_path / "m.json").write_bytes(dump_manifest(m))
    again = load_manifest(tmp_path / "m.json")
    assert again == m and again.canonical_bytes() == m.canonical_bytes()


def test_load_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.json")


def test_load_error_keeps_field(tmp_path: Path) -> None:
    d = doc()
    d["signed"]["files"][0]["size"] = -1
    (tmp_path / "m.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "m.json")
    assert info.value.field == "files[0].size"
    assert str(tmp_path / "m.json") in str(info.value)


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        target: Any = d
        keys = path.split(".")
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


def _del(path: str) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        target: Any = d
        keys = path.split(".")
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        del target[int(last) if isinstance(target, list) else last]

    return mutate


def _add_file(entry: dict[str, Any]) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["signed"]["files"].append(entry)

    return mutate


def _file(path: str) -> dict[str, Any]:
    return {"path": path, "size": 5, "sha256": sha(b"hello")}


P = "signed.files.0."
HOSTILE = {
    "signed not an object": (_set("signed", []), "signed"),
    "unknown top key": (_set("extra", 1), "manifest"),
    "missing signatures": (_del("signatures"), "manifest"),
    "unknown signed key": (_set("signed.requierd", True), "signed"),
    "schema 2": (_set("signed.schema", 2), "signed.schema"),
    "schema as string": (_set("signed.schema", "1"), "signed.schema"),
    "serial negative": (_set("signed.serial", -1), "signed.serial"),
    "serial bool": (_set("signed.serial", True), "signed.serial"),
    "float anywhere": (_set("signed.serial", 1.0), "signed.serial"),
    "bad created": (_set("signed.created", "yesterday"), "signed.created"),
    "impossible date": (_set("signed.created", "2026-02-30T10:00:00Z"), "signed.created"),
    "expires before created": (_set("signed.expires", "2020-01-01T00:00:00Z"), "signed.expires"),
    "empty name": (_set("signed.name", ""), "signed.name"),
    "files not list": (_set("signed.files", {}), "signed.files"),
    "size negative": (_set(P + "size", -1), "files[0].size"),
    "size absurd": (_set(P + "size", 1 << 60), "files[0].size"),
    "size string": (_set(P + "size", "10"), "files[0].size"),
    "bad hex": (_set(P + "sha256", "zz" * 32), "files[0].sha256"),
    "short hex": (_set(P + "sha256", "ab"), "files[0].sha256"),
    "upper-case hex": (_set(P + "sha256", sha(b"x").upper()), "files[0].sha256"),
    "required not bool": (_set(P + "required", "yes"), "files[0].required"),
    "unknown file key": (_set(P + "mode", 493), "files[0]"),
    "absolute path": (_set(P + "path", "/etc/passwd"), "files[0].path"),
    "dot-dot": (_set(P + "path", "a/../../etc/passwd"), "files[0].path"),
    "dot segment": (_set(P + "path", "a/./one.bin"), "files[0].path"),
    "backslash": (_set(P + "path", "a\\one.bin"), "files[0].path"),
    "NUL": (_set(P + "path", "a/one\x00.bin"), "files[0].path"),
    "control char": (_set(P + "path", "a/one\n.bin"), "files[0].path"),
    "C1 control CSI": (_set(P + "path", "a/one\x9b31m.bin"), "files[0].path"),
    "C1 next line": (_set(P + "path", "a/one\x85.bin"), "files[0].path"),
    "line separator": (_set(P + "path", "a/one\u2028.bin"), "files[0].path"),
    "paragraph separator": (_set(P + "path", "a/one\u2029.bin"), "files[0].path"),
    "bidi override": (_set(P + "path", "a/evil\u202egpj.exe"), "files[0].path"),
    "zero-width non-joiner": (_set(P + "path", ".ken\u200csho/state.db"), "files[0].path"),
    "byte order mark": (_set(P + "path", "\ufeffa/one.bin"), "files[0].path"),
    "empty segment": (_set(P + "path", "a//one.bin"), "files[0].path"),
    "trailing slash": (_set(P + "path", "a/"), "files[0].path"),
    "drive letter": (_set(P + "path", "C:/windows"), "files[0].path"),
    "not NFC": (_set(P + "path", "cafe\u0301"), "files[0].path"),
    "lone surrogate": (_set(P + "path", "a\ud800"), "files[0].path"),
    "into .kensho": (_set(P + "path", ".kensho/state.db"), "files[0].path"),
    "empty path": (_set(P + "path", ""), "files[0].path"),
    "duplicate path": (_add_file(_file("b.txt")), "files[3].path"),
    "case collision": (_add_file(_file("B.TXT")), "files[3].path"),
    "file is a folder": (_add_file(_file("b.txt/inner")), "files[3].path"),
    "chunk gap": (_set(P + "chunks.1.offset", 4097), "files[0].chunks[1].offset"),
    "chunk overlap": (_set(P + "chunks.1.offset", 4000), "files[0].chunks[1].offset"),
    "chunk past end": (_set(P + "chunks.2.size", 5000), "files[0].chunks[2].size"),
    "chunks short": (_del(P + "chunks.2"), "files[0].chunks"),
    "chunk zero size": (_set(P + "chunks.0.size", 0), "files[0].chunks[0].size"),
    "chunk bad hex": (_set(P + "chunks.0.sha256", "x"), "files[0].chunks[0].sha256"),
    "empty chunks for data": (_set(P + "chunks", []), "files[0].chunks"),
    "single chunk hash differs": (
        _set("signed.files.1.chunks.0.sha256", sha(b"other")),
        "files[1].chunks[0].sha256",
    ),
    "signature not object": (_set("signatures", ["abc"]), "signatures[0]"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE), ids=sorted(HOSTILE))
def test_hostile_manifest_is_rejected_naming_the_field(case: str) -> None:
    mutate, field = HOSTILE[case]
    d = copy.deepcopy(doc())
    mutate(d)
    with pytest.raises(ManifestError) as info:
        parse_manifest(d)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(field)


def test_non_ascii_names_that_display_as_written_are_accepted() -> None:
    names = ["modèles/日本語/vocab.json", "données/straße 🙂.bin", "中文/文件.txt"]
    d = doc()
    for entry, name in zip(d["signed"]["files"], names, strict=True):
        entry["path"] = name
    assert [f.path for f in parse_manifest(d).files] == names


@pytest.mark.parametrize(
    ("char", "shown"),
    [("\x9b", "\\x9b"), ("\x85", "\\x85"), ("\u2028", "\\u2028"), ("\u202e", "\\u202e")],
    ids=["CSI", "NEL", "LS", "RLO"],
)
def test_cli_refuses_invisible_characters_in_paths_writing_nothing(
    tmp_path: Path, char: str, shown: str
) -> None:
    d = doc()
    d["signed"]["files"][1]["path"] = f"b{char}.txt"
    (tmp_path / "m.json").write_text(json.dumps(d), encoding="utf-8")
    src = tmp_path / "src"
    write_tree(src, {f"b{char}.txt": b"hello"})
    root = tmp_path / "store"
    done = kensho("sync", "-m", "m.json", "-r", root, "-s", src, cwd=tmp_path)
    assert done.returncode == 10, done.stderr
    assert "files[1].path" in done.stderr and "control characters" in done.stderr
    assert shown in done.stderr  # the character is named, not sent to the terminal
    assert char not in done.stderr
    assert not root.exists()


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe not utf-8",
        b"{",
        b'{"signed": NaN}',
        b'{"signed": {}, "signed": {}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"signed": 1' + b"0" * 5000 + b"}",
    ],
    ids=["not-utf8", "truncated", "nan", "duplicate-key", "deep-nesting", "huge-int"],
)
def test_malformed_json_raises_manifest_error(text: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


def _near_valid() -> st.SearchStrategy[Any]:
    """Valid documents with one value replaced by arbitrary JSON."""
    base = doc()
    paths = [
        "signed",
        "signatures",
        "signed.files",
        "signed.files.0",
        "signed.files.0.path",
        "signed.files.0.chunks",
        "signed.files.0.chunks.1",
        "signed.serial",
        "signed.created",
    ]

    def replace(args: tuple[str, Any]) -> Any:
        d = copy.deepcopy(base)
        _set(args[0], args[1])(d)
        return d

    return st.tuples(st.sampled_from(paths), json_values).map(replace)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, _near_valid()))
def test_arbitrary_json_raises_only_manifest_error(value: Any) -> None:
    try:
        text = json.dumps(value)
    except ValueError:
        return
    with contextlib.suppress(ManifestError):
        parse_manifest(text)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data)


async def test_build_manifest_hashes_folder(tmp_path: Path) -> None:
    files = {"models/w.bin": bytes(range(256)) * 100, "cfg.json": b"{}", "docs/readme.md": b"hi"}
    write_tree(tmp_path, files)
    (tmp_path / ".kensho").mkdir()
    (tmp_path / ".kensho" / "state.db").write_bytes(b"ignored")
    m = await build_manifest(
        tmp_path, name="demo", version="2.0", serial=3, chunk_size=1000, optional=["docs/*"]
    )
    assert [f.path for f in m.files] == ["cfg.json", "docs/readme.md", "models/w.bin"]
    w = m.files[2]
    assert w.sha256 == sha(files["models/w.bin"]) and w.size == 25600
    assert len(w.chunks) == 26 and w.chunks[-1].size == 600
    assert w.chunks[3].sha256 == sha(files["models/w.bin"][3000:4000])
    assert [f.required for f in m.files] == [True, False, True]
    assert m.serial == 3 and m.version == "2.0"


async def test_build_manifest_rejects_symlinks(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": b"1"})
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with pytest.raises(ManifestError, match="symbolic link"):
        await build_manifest(tmp_path, name="x", version="1")


async def test_build_manifest_rejects_bad_names(tmp_path: Path) -> None:
    write_tree(tmp_path, {"A.txt": b"1", "a.txt": b"2"})
    with pytest.raises(ManifestError, match="differs only by case"):
        await build_manifest(tmp_path, name="x", version="1")


def test_default_chunk_size_is_4_mib() -> None:
    assert DEFAULT_CHUNK_SIZE == 4 * 1024 * 1024
