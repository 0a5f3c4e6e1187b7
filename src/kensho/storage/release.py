"""Which release a store runs on, and whether it may be trusted.

A :class:`StorageManager` runs on one manifest at a time: the one it was given (a
sync or an update), or the one last trusted under ``.kensho/`` (offline boot).
:class:`Release` records that choice and what the trust checks found; it is
immutable, so a step that may be undone (a refused update, a dry run) keeps the
record it started from and puts it back, instead of saving fields one by one.

:class:`ReleaseTrust` makes the decisions (docs/signing.md): signatures against the
keys pinned in the store and the configured ones, no rollback below the trusted
serial (re-read from disk, also under the store lock), expiry (which forbids
fetching but not verifying), and pinning keys once a release is trusted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from kensho.errors import ManifestError, SignatureError
from kensho.storage.manifest import Manifest, parse_manifest
from kensho.storage.signing import (
    TrustedKeys,
    check_expiry,
    check_rollback,
    manifest_digest,
    verify_signatures,
)
from kensho.storage.state import StateStore
from kensho.telemetry import get_logger

__all__ = ["Release", "ReleaseTrust"]

_log = get_logger("storage")
_warned_unsigned = False


def _warn_unsigned_once() -> None:
    """Unsigned manifests are accepted when no key is configured: say so once per boot."""
    global _warned_unsigned  # noqa: PLW0603 - once per process, by design
    if not _warned_unsigned:
        _warned_unsigned = True
        _log.warning(
            "manifest signatures are not checked: no trusted keys are configured "
            "(add [trust] keys to require signed manifests)"
        )


@dataclass(frozen=True, slots=True)
class Release:
    """The manifest a manager runs on, and what is known of its trust.

    ``manifest``: ``None`` until the trusted one is loaded. ``given``: passed by the
    caller (a sync or update), so the rollback rule applies and it is recorded as
    trusted once good; otherwise it is the trusted one, whose bytes are ``data``.
    ``checked``: the trust checks ran; ``expired``: they found it expired.
    """

    manifest: Manifest | None = None
    given: bool = False
    checked: bool = False
    expired: SignatureError | None = None
    data: bytes | None = None

    @classmethod
    def of(cls, manifest: Manifest | None) -> Release:
        """A release given by the caller, or (``None``) the trusted one, loaded on use."""
        return cls(manifest, given=manifest is not None)

    @classmethod
    def trusted(cls, data: bytes) -> Release:
        """The trusted manifest ``data``; its trust is checked at the next use."""
        return cls(parse_manifest(data), data=data)

    def refuse_if_expired(self) -> None:
        """Raise the expiry error: an expired release fetches and updates nothing."""
        if self.expired is not None:
            raise self.expired


@dataclass
class ReleaseTrust:
    """The trust decisions of one store: its state folder, the configured keys, a clock."""

    state: StateStore
    keys: TrustedKeys
    now: Callable[[], datetime]

    async def trusted_manifest(self) -> Manifest | None:
        """The manifest last trusted for the store, or ``None`` before the first sync."""
        data = await asyncio.to_thread(self.state.load_trusted_manifest)
        return None if data is None else parse_manifest(data)

    async def select(self, release: Release) -> Release:
        """``release`` loaded (the trusted one if none was given) and trust-checked."""
        if release.manifest is None:
            data = await asyncio.to_thread(self.state.load_trusted_manifest)
            if data is None:
                raise ManifestError(
                    f"no manifest given and none trusted yet under {self.state.dir}; "
                    "pass --manifest (or set storage.manifest) for the first sync. To make "
                    f"one for the model folder: kensho manifest build {self.state.dir.parent} "
                    "-o manifest.json (then kensho manifest sign, optionally)"
                )
            release = Release.trusted(data)
        if release.checked:
            return release
        assert release.manifest is not None
        return await self._check(release, release.manifest)

    async def recheck(self, release: Release) -> Release:
        """Under the lock: ``release`` against the trusted state another process may
        have changed since.

        A given manifest must still pass the rollback rule (an update may have moved
        the store past it while this run waited for the lock). A run on the trusted
        manifest switches to the one trusted now, so it repairs against the current
        release and never reverts another process's update.
        """
        release = await self.select(release)
        assert release.manifest is not None
        if release.given:
            await self.check_not_older(release.manifest)
            return release
        data = await asyncio.to_thread(self.state.load_trusted_manifest)
        if data is None or data == release.data:
            return release
        now = await self.select(Release.trusted(data))
        assert now.manifest is not None
        _log.info(
            "the trusted release changed while waiting for the lock",
            from_serial=release.manifest.serial,
            to_serial=now.manifest.serial,
        )
        return now

    @staticmethod
    def accept_update(root: Path, current: Manifest | None, new: Manifest) -> Manifest:
        """The trusted manifest to update from; refuse an update that is not one."""
        if current is None:
            raise ManifestError(
                f"{root} has no trusted manifest yet, so there is nothing to update; "
                "run `kensho sync --manifest ...` once to fill the store"
            )
        if new.serial <= current.serial:
            raise ManifestError(
                f"manifest serial {new.serial} is not newer than the trusted serial "
                f"{current.serial} of {root}; an update needs a higher serial",
                field="signed.serial",
            )
        return current

    async def check_not_older(self, manifest: Manifest) -> None:
        """The rollback rule against the trusted manifest on disk *now* (re-read)."""
        data = await asyncio.to_thread(self.state.load_trusted_manifest)
        if data is None:
            return
        try:
            trusted = parse_manifest(data)
        except ManifestError:  # a damaged record must not block a good manifest
            return
        check_rollback(manifest, trusted.serial, manifest_digest(trusted))

    async def pinned_keys(self) -> TrustedKeys | None:
        """The keys pinned in the store at its first signed sync, or ``None``."""
        data = await asyncio.to_thread(self.state.load_pinned_keys)
        return None if data is None else TrustedKeys.load(data, self.state.keys_path)

    async def keys_to_pin(self) -> bool:
        """Whether the configured keys differ from the pinned ones (first pin, rotation)."""
        return self.keys.enabled and not self.keys.same_as(await self.pinned_keys())

    async def pin_keys(self) -> None:
        """Pin the configured keys: at the first signed sync, or as a rotation.

        Called once the manifest in use passed them (and any pinned keys, see
        :meth:`_check_signatures`) and is trusted.
        """
        if not self.keys.enabled:
            return
        pinned = await self.pinned_keys()
        if self.keys.same_as(pinned):
            return
        await asyncio.to_thread(self.state.save_pinned_keys, self.keys.dump())
        _log.warning(
            "trusted keys pinned in the store" if pinned is None else "trusted keys rotated",
            path=str(self.state.keys_path),
            keys=len(self.keys.keys),
            threshold=self.keys.threshold,
        )

    async def _check(self, release: Release, manifest: Manifest) -> Release:
        await self._check_signatures(manifest)
        if release.given:
            await self.check_not_older(manifest)
        expired: SignatureError | None = None
        try:
            check_expiry(manifest, self.now())
        except SignatureError as exc:
            expired = exc
            _log.warning(
                "manifest expired: files verified under it keep working offline, but it "
                "is not used to fetch anything",
                serial=manifest.serial,
                expires=manifest.expires,
            )
        return dataclasses.replace(release, checked=True, expired=expired)

    async def _check_signatures(self, manifest: Manifest) -> None:
        """The pinned keys always apply; settings naming other keys apply as well.

        Why both: the pin keeps a store signed when a run lacks the settings, and
        settings with new keys (a rotation, see docs/signing.md) take effect only
        through a manifest that the pinned keys signed too.
        """
        pinned = await self.pinned_keys()
        configured = self.keys
        if pinned is None and not configured.enabled:
            _warn_unsigned_once()
            return
        signers: tuple[str, ...] = ()
        rotating = configured.enabled and not configured.same_as(pinned)
        if pinned is not None:
            try:
                signers = verify_signatures(manifest, pinned)
            except SignatureError as exc:
                if not rotating:
                    raise
                raise SignatureError(
                    f"{exc}. The [trust] settings name other keys than the pinned ones: "
                    "a key change is accepted only from a manifest signed by the pinned "
                    "keys as well (docs/signing.md, 'Pinned keys')"
                ) from None
        if rotating:
            signers = verify_signatures(manifest, configured)
        _log.info("manifest signature verified", serial=manifest.serial, signers=len(signers))
