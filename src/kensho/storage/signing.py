"""Ed25519 signatures over manifests, and the trust rules that use them.

A signature covers :func:`~kensho.storage.manifest.canonical_bytes` of the manifest's
``signed`` object (sorted keys, compact separators, UTF-8; documented in
``docs/manifest.md``). Keys are identified by their *key id*: the SHA-256 of the raw
32-byte public key, in hex, as in TUF. All cryptography is done by ``cryptography``.

Trust rules, each failing with a :class:`~kensho.errors.SignatureError` that says which
check failed:

- **threshold**: at least ``k`` valid signatures from distinct trusted keys (k of n).
  Signatures from unknown keys are ignored, never counted; two signatures from the same
  key count once (and a refusal says the key was listed twice).
- **pinning**: the keys and threshold a store first trusted are kept in
  ``.kensho/trusted-keys.json`` (:meth:`TrustedKeys.dump`), as TUF pins its root, so
  forgetting the settings never turns the checks off (the manager applies this rule).
- **rollback**: a manifest whose ``serial`` is lower than the last trusted one is
  refused, and so is the same serial with different content (a replayed or forked
  release).
- **freeze**: an expired manifest is never used to fetch or update anything. Files
  already verified under it may still boot offline (the caller decides, with a warning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from kensho.errors import ConfigError, KenshoError, SignatureError
from kensho.storage.manifest import Manifest, Signature

__all__ = [
    "TrustedKeys",
    "check_expiry",
    "check_rollback",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "manifest_digest",
    "public_key_from_hex",
    "public_key_hex",
    "save_private_key",
    "sign_manifest",
    "verify_signatures",
]


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: how manifests and configs name a key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_hex(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 hex characters (what goes in the config)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a public key written by ``kensho keygen``; ``ConfigError`` if malformed."""
    cleaned = text.strip().lower().removeprefix("ed25519:")
    try:
        raw = bytes.fromhex(cleaned)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes instead of 32")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ConfigError(
            f"trusted key {text[:80]!r} is not an Ed25519 public key in hex "
            f"(64 hex characters, as printed by `kensho keygen`): {exc}",
            key="trust.keys",
        ) from None


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write ``key`` as PKCS#8 PEM, created with mode 0600 (never readable by others).

    The file is created with its final permissions in one ``open`` call, so there is
    no moment when another user could read it; an existing file is refused unless
    ``overwrite`` (a lost signing key cannot be recovered).
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SignatureError(
            f"{path} already exists; refusing to overwrite a signing key "
            "(choose another path or pass --force)"
        ) from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a key written by :func:`save_private_key`; ``SignatureError`` if it is not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 of the canonical ``signed`` bytes: identifies a release's content."""
    return hashlib.sha256(manifest.canonical_bytes()).hexdigest()


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """The manifest with ``key``'s signature added (replacing an older one by that key)."""
    kid = key_id(key.public_key())
    signature = Signature(keyid=kid, sig=key.sign(manifest.canonical_bytes()).hex())
    others = tuple(s for s in manifest.signatures if s.keyid != kid)
    return dataclasses.replace(manifest, signatures=(*others, signature))


_SETTINGS = "the [trust] settings"


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a manifest may be signed by, and how many must agree.

    ``origin`` says where they come from, for error messages only (it is not part of
    equality): the ``[trust]`` settings, or the keys pinned in a store.
    """

    keys: Mapping[str, Ed25519PublicKey]
    threshold: int = 1
    origin: str = field(default=_SETTINGS, compare=False)

    def __post_init__(self) -> None:
        if self.keys and not 1 <= self.threshold <= len(self.keys):
            raise ConfigError(
                f"trust.threshold is {self.threshold} but {len(self.keys)} trusted "
                f"key(s) are configured; it must be between 1 and {len(self.keys)}",
                key="trust.threshold",
            )

    @classmethod
    def from_hex(
        cls, public_keys: Iterable[str], threshold: int = 1, *, origin: str = _SETTINGS
    ) -> TrustedKeys:
        keys = [public_key_from_hex(text) for text in public_keys]
        return cls({key_id(k): k for k in keys}, threshold, origin)

    @property
    def enabled(self) -> bool:
        """False when no key is configured: unsigned manifests are then accepted."""
        return bool(self.keys)

    def same_as(self, other: TrustedKeys | None) -> bool:
        """Whether ``other`` names exactly these keys with this threshold."""
        return (
            other is not None
            and set(self.keys) == set(other.keys)
            and self.threshold == other.threshold
        )

    def dump(self) -> bytes:
        """JSON for ``.kensho/trusted-keys.json``: sorted public keys and the threshold."""
        keys = sorted(public_key_hex(k) for k in self.keys.values())
        doc = {"keys": keys, "threshold": self.threshold}
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def load(cls, data: bytes, path: Path) -> TrustedKeys:
        """Parse :meth:`dump`'s output, read from ``path``; ``SignatureError`` if damaged.

        Why not fall back to "no keys": a pin that cannot be read must not switch
        the signature checks off, which is exactly what pinning prevents.
        """
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or set(doc) != {"keys", "threshold"}:
                raise ValueError('expected an object with "keys" and "threshold"')
            keys, threshold = doc["keys"], doc["threshold"]
            if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
                raise ValueError('"keys" must be a non-empty list of hex strings')
            if not isinstance(threshold, int) or isinstance(threshold, bool):
                raise ValueError('"threshold" must be an integer')
            return cls.from_hex(keys, threshold, origin=f"the store (pinned in {path})")
        except (ValueError, KenshoError) as exc:  # JSONDecodeError is a ValueError
            raise SignatureError(
                f"{path} is damaged ({exc}); it pins the keys this store trusts, so no "
                "manifest is accepted until it is restored (or deleted: the next signed "
                "sync then pins the [trust] settings anew)"
            ) from None


def verify_signatures(manifest: Manifest, trusted: TrustedKeys) -> tuple[str, ...]:
    """Check the threshold; return the key ids whose signatures are valid.

    Raises :class:`SignatureError` listing what was wrong with each signature when
    fewer than ``threshold`` distinct trusted keys signed the exact ``signed`` bytes.
    """
    payload = manifest.canonical_bytes()
    valid: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    for sig in manifest.signatures:
        key = trusted.keys.get(sig.keyid)
        short = sig.keyid[:12]
        if sig.keyid in seen:
            problems.append(f"key {short}… is listed more than once (it counts once)")
            continue
        seen.add(sig.keyid)
        if key is None:
            problems.append(f"key {short}… is not trusted")
            continue
        try:
            key.verify(bytes.fromhex(sig.sig), payload)
        except (InvalidSignature, ValueError):
            problems.append(f"signature by key {short}… does not match the manifest content")
            continue
        valid.append(sig.keyid)
    if len(valid) < trusted.threshold:
        detail = "; ".join(problems) if problems else "the manifest carries no signatures"
        raise SignatureError(
            f"manifest {manifest.name!r} serial {manifest.serial}: {len(valid)} valid "
            f"signature(s) from keys trusted by {trusted.origin}, {trusted.threshold} "
            f"required ({detail})"
        )
    return tuple(valid)


def check_rollback(manifest: Manifest, last_serial: int | None, last_digest: str | None) -> None:
    """Refuse an older release, or a different release reusing the trusted serial."""
    if last_serial is None:
        return
    if manifest.serial < last_serial:
        raise SignatureError(
            f"rollback refused: manifest {manifest.name!r} has serial {manifest.serial}, "
            f"lower than the last trusted serial {last_serial}"
        )
    if manifest.serial == last_serial and last_digest and manifest_digest(manifest) != last_digest:
        raise SignatureError(
            f"manifest {manifest.name!r} reuses the trusted serial {last_serial} with "
            "different content; a new release needs a higher serial"
        )


def check_expiry(manifest: Manifest, now: datetime | None = None) -> None:
    """Refuse an expired manifest for fetching or updating (freeze protection)."""
    if manifest.expires is None:
        return
    expires = datetime.fromisoformat(manifest.expires.replace("Z", "+00:00"))
    current = now or datetime.now(UTC)
    if current >= expires:
        raise SignatureError(
            f"manifest {manifest.name!r} serial {manifest.serial} expired at "
            f"{manifest.expires}; it is not used to fetch or update anything "
            "(publish a fresh manifest)"
        )
