"""Signed manifests: Ed25519 via cryptography, k-of-n trust, rollback and freeze rules."""

from __future__ import annotations

import dataclasses
import hashlib
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kensho.errors import ConfigError, SignatureError
from kensho.storage.manifest import Manifest, Signature, dump_manifest, parse_manifest
from kensho.storage.signing import (
    TrustedKeys,
    check_expiry,
    check_rollback,
    generate_private_key,
    key_id,
    load_private_key,
    manifest_digest,
    public_key_from_hex,
    public_key_hex,
    save_private_key,
    sign_manifest,
    verify_signatures,
)

DATA = b"hello kensho\n"


def make_manifest(serial: int = 3, *, version: str = "1.0.0", **extra: Any) -> Manifest:
    sha = hashlib.sha256(DATA).hexdigest()
    signed = {
        "schema": 1,
        "name": "demo",
        "version": version,
        "serial": serial,
        "created": "2026-11-25T10:00:00Z",
        "files": [
            {
                "path": "a.txt",
                "size": len(DATA),
                "sha256": sha,
                "version": version,
                "changelog": "",
                "required": True,
                "chunks": [{"offset": 0, "size": len(DATA), "sha256": sha}],
            }
        ],
        **extra,
    }
    return parse_manifest({"signed": signed, "signatures": []})


def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    key = generate_private_key()
    raw = bytes.fromhex(public_key_hex(key.public_key()))
    assert len(raw) == 32
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()


def test_public_key_round_trips_through_hex() -> None:
    pub = generate_private_key().public_key()
    assert key_id(public_key_from_hex(public_key_hex(pub))) == key_id(pub)
    assert key_id(public_key_from_hex("ed25519:" + public_key_hex(pub).upper())) == key_id(pub)


@pytest.mark.parametrize("bad", ["", "zz", "00" * 31, "00" * 33])
def test_malformed_public_key_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="Ed25519 public key"):
        public_key_from_hex(bad)


def test_private_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    key = generate_private_key()
    path = tmp_path / "signing.key"
    save_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())


def test_existing_key_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    save_private_key(path, generate_private_key())
    before = path.read_bytes()
    with pytest.raises(SignatureError, match="refusing to overwrite"):
        save_private_key(path, generate_private_key())
    assert path.read_bytes() == before


def test_loading_something_that_is_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "not.key"
    path.write_text("hello")
    with pytest.raises(SignatureError, match="not an unencrypted PEM"):
        load_private_key(path)
    with pytest.raises(SignatureError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")


def test_signed_manifest_verifies_and_survives_serialisation() -> None:
    key = generate_private_key()
    signed = sign_manifest(make_manifest(), key)
    reparsed = parse_manifest(dump_manifest(signed))
    trusted = TrustedKeys.from_hex([public_key_hex(key.public_key())])
    assert verify_signatures(reparsed, trusted) == (key_id(key.public_key()),)


def test_resigning_with_the_same_key_replaces_its_signature() -> None:
    key = generate_private_key()
    twice = sign_manifest(sign_manifest(make_manifest(), key), key)
    assert len(twice.signatures) == 1


def test_tampered_content_is_refused() -> None:
    key = generate_private_key()
    signed = sign_manifest(make_manifest(), key)
    doc: dict[str, Any] = {
        "signed": dict(signed.raw_signed),
        "signatures": [{"keyid": s.keyid, "sig": s.sig} for s in signed.signatures],
    }
    doc["signed"]["version"] = "6.6.6"
    tampered = parse_manifest(doc)
    trusted = TrustedKeys.from_hex([public_key_hex(key.public_key())])
    with pytest.raises(SignatureError, match="does not match the manifest content"):
        verify_signatures(tampered, trusted)


def test_signature_by_an_untrusted_key_is_refused() -> None:
    signed = sign_manifest(make_manifest(), generate_private_key())
    trusted = TrustedKeys.from_hex([public_key_hex(generate_private_key().public_key())])
    with pytest.raises(SignatureError, match="is not trusted"):
        verify_signatures(signed, trusted)


def test_unsigned_manifest_is_refused_when_keys_are_configured() -> None:
    trusted = TrustedKeys.from_hex([public_key_hex(generate_private_key().public_key())])
    with pytest.raises(SignatureError, match="carries no signatures"):
        verify_signatures(make_manifest(), trusted)


def test_threshold_needs_k_distinct_trusted_keys() -> None:
    a, b, c = (generate_private_key() for _ in range(3))
    trusted = TrustedKeys.from_hex([public_key_hex(k.public_key()) for k in (a, b, c)], 2)
    one = sign_manifest(make_manifest(), a)
    with pytest.raises(SignatureError, match="1 valid signature"):
        verify_signatures(one, trusted)
    duplicated = _with_signatures(one, one.signatures * 2)
    with pytest.raises(SignatureError, match="2 required"):
        verify_signatures(duplicated, trusted)
    two = sign_manifest(one, c)
    assert set(verify_signatures(two, trusted)) == {key_id(a.public_key()), key_id(c.public_key())}


def test_a_key_listed_twice_is_named_in_the_refusal() -> None:
    a, b = generate_private_key(), generate_private_key()
    trusted = TrustedKeys.from_hex([public_key_hex(k.public_key()) for k in (a, b)], 2)
    one = sign_manifest(make_manifest(), a)
    with pytest.raises(SignatureError, match="listed more than once") as info:
        verify_signatures(_with_signatures(one, one.signatures * 2), trusted)
    assert "carries no signatures" not in str(info.value)


def test_pinned_keys_round_trip_and_name_their_file(tmp_path: Path) -> None:
    a, b = generate_private_key(), generate_private_key()
    keys = TrustedKeys.from_hex([public_key_hex(k.public_key()) for k in (a, b)], 2)
    pinned = TrustedKeys.load(keys.dump(), tmp_path / "trusted-keys.json")
    assert pinned == keys and pinned.same_as(keys)
    assert str(tmp_path / "trusted-keys.json") in pinned.origin
    assert not pinned.same_as(TrustedKeys.from_hex([public_key_hex(a.public_key())]))
    assert not pinned.same_as(None)


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b"[]",
        b'{"keys": [], "threshold": 1}',
        b'{"keys": ["zz"], "threshold": 1}',
        b'{"keys": ["%s"], "threshold": 2}',
        b'{"keys": ["%s"], "threshold": true}',
    ],
)
def test_a_damaged_pin_is_a_signature_error_naming_the_file(tmp_path: Path, damage: bytes) -> None:
    hex_key = public_key_hex(generate_private_key().public_key()).encode()
    data = damage.replace(b"%s", hex_key)
    with pytest.raises(SignatureError, match=r"trusted-keys\.json is damaged"):
        TrustedKeys.load(data, tmp_path / "trusted-keys.json")


def _with_signatures(manifest: Manifest, signatures: tuple[Signature, ...]) -> Manifest:
    return dataclasses.replace(manifest, signatures=signatures)


def test_garbage_signature_text_is_refused_not_crashing() -> None:
    key = generate_private_key()
    kid = key_id(key.public_key())
    bad = _with_signatures(make_manifest(), (Signature(keyid=kid, sig="not-hex"),))
    trusted = TrustedKeys.from_hex([public_key_hex(key.public_key())])
    with pytest.raises(SignatureError, match="does not match"):
        verify_signatures(bad, trusted)


def test_threshold_larger_than_the_key_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        TrustedKeys.from_hex([public_key_hex(generate_private_key().public_key())], 2)


def test_no_keys_means_trust_is_disabled() -> None:
    assert not TrustedKeys({}).enabled


def test_rollback_to_a_lower_serial_is_refused() -> None:
    with pytest.raises(SignatureError, match="rollback refused"):
        check_rollback(make_manifest(serial=4), last_serial=5, last_digest="x")


def test_same_serial_with_different_content_is_refused() -> None:
    trusted = make_manifest(serial=5)
    check_rollback(trusted, last_serial=5, last_digest=manifest_digest(trusted))
    other = make_manifest(serial=5, version="1.0.1")
    with pytest.raises(SignatureError, match="reuses the trusted serial 5"):
        check_rollback(other, last_serial=5, last_digest=manifest_digest(trusted))


def test_higher_serial_and_first_manifest_are_accepted() -> None:
    check_rollback(make_manifest(serial=6), last_serial=5, last_digest="x")
    check_rollback(make_manifest(serial=0), last_serial=None, last_digest=None)


def test_expired_manifest_is_refused_for_fetching() -> None:
    manifest = make_manifest(expires="2026-12-01T00:00:00Z")
    check_expiry(manifest, datetime(2026, 11, 30, tzinfo=UTC))
    with pytest.raises(SignatureError, match="expired at 2026-12-01T00:00:00Z"):
        check_expiry(manifest, datetime(2026, 12, 1, tzinfo=UTC))
    check_expiry(make_manifest(), datetime(2100, 1, 1, tzinfo=UTC))
