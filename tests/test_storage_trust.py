"""Signed manifests in the store: k-of-n trust, rollback, freeze, lying mirrors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from _storage_support import signed_for
from kensho.errors import IntegrityError, SignatureError
from kensho.storage import MemorySource, Source, StorageManager, parse_manifest
from kensho.storage import manager as manager_module
from kensho.storage.manifest import Manifest
from kensho.storage.signing import (
    TrustedKeys,
    generate_private_key,
    public_key_hex,
    sign_manifest,
)
from kensho.telemetry.testing import capture_logs

FILES = {"model.bin": b"w" * 10_000, "config.json": b'{"layers": 2}'}
KEY = generate_private_key()
TRUST = TrustedKeys.from_hex([public_key_hex(KEY.public_key())])


def manifest(serial: int = 1, files: dict[str, bytes] = FILES, **extra: Any) -> Manifest:
    signed = signed_for(files, 4096, serial=serial, **extra)
    return parse_manifest({"signed": signed, "signatures": []})


async def boot(
    root: Path,
    m: Manifest | None,
    sources: list[Source] | None = None,
    *,
    trust: TrustedKeys = TRUST,
    now: datetime | None = None,
    repair_concurrency: int = 2,
) -> StorageManager:
    store = StorageManager(
        root,
        m,
        sources or [],
        trust=trust,
        now=(lambda: now) if now else lambda: datetime.now(UTC),
        repair_concurrency=repair_concurrency,
    )
    try:
        async for _ in store.initialize_and_verify():
            pass
    finally:
        await store.aclose()
    return store


async def test_signed_manifest_is_used_and_becomes_trusted(tmp_path: Path) -> None:
    source = MemorySource(FILES)
    store = await boot(tmp_path, sign_manifest(manifest(), KEY), [source])
    assert store.report is not None and store.report.ok
    assert (tmp_path / "model.bin").read_bytes() == FILES["model.bin"]
    offline = await boot(tmp_path, None)  # the trusted manifest boots offline
    assert offline.report is not None and offline.report.ok


async def test_unsigned_manifest_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source = MemorySource(FILES)
    with pytest.raises(SignatureError, match="carries no signatures"):
        await boot(tmp_path, manifest(), [source])
    assert source.bytes_served == 0
    assert not (tmp_path / "model.bin").exists()


async def test_tampered_manifest_is_refused(tmp_path: Path) -> None:
    good = sign_manifest(manifest(), KEY)
    raw = dict(good.raw_signed)
    raw["version"] = "9.9.9"
    tampered = parse_manifest(
        {"signed": raw, "signatures": [{"keyid": s.keyid, "sig": s.sig} for s in good.signatures]}
    )
    with pytest.raises(SignatureError, match="does not match"):
        await boot(tmp_path, tampered, [MemorySource(FILES)])


async def test_wrong_key_is_refused(tmp_path: Path) -> None:
    other = sign_manifest(manifest(), generate_private_key())
    with pytest.raises(SignatureError, match="not trusted"):
        await boot(tmp_path, other, [MemorySource(FILES)])


async def test_below_threshold_is_refused(tmp_path: Path) -> None:
    second = generate_private_key()
    two_of_two = TrustedKeys.from_hex(
        [public_key_hex(KEY.public_key()), public_key_hex(second.public_key())], 2
    )
    with pytest.raises(SignatureError, match="1 valid signature"):
        await boot(
            tmp_path, sign_manifest(manifest(), KEY), [MemorySource(FILES)], trust=two_of_two
        )
    both = sign_manifest(sign_manifest(manifest(), KEY), second)
    store = await boot(tmp_path, both, [MemorySource(FILES)], trust=two_of_two)
    assert store.report is not None and store.report.ok


async def test_rollback_to_a_lower_serial_is_refused(tmp_path: Path) -> None:
    await boot(tmp_path, sign_manifest(manifest(serial=5), KEY), [MemorySource(FILES)])
    with pytest.raises(SignatureError, match="rollback refused"):
        await boot(tmp_path, sign_manifest(manifest(serial=4), KEY), [MemorySource(FILES)])


async def test_same_serial_with_different_content_is_refused(tmp_path: Path) -> None:
    await boot(tmp_path, sign_manifest(manifest(serial=5), KEY), [MemorySource(FILES)])
    again = await boot(tmp_path, sign_manifest(manifest(serial=5), KEY))  # same release: fine
    assert again.report is not None and again.report.ok
    forked = sign_manifest(manifest(serial=5, version="5.0.1"), KEY)
    with pytest.raises(SignatureError, match="reuses the trusted serial 5"):
        await boot(tmp_path, forked, [MemorySource(FILES)])


async def test_expired_manifest_is_never_used_to_fetch(tmp_path: Path) -> None:
    expiring = sign_manifest(manifest(expires="2026-12-01T00:00:00Z"), KEY)
    source = MemorySource(FILES)
    with pytest.raises(IntegrityError) as info:
        await boot(tmp_path, expiring, [source], now=datetime(2027, 1, 1, tzinfo=UTC))
    assert "manifest expired at 2026-12-01T00:00:00Z" in info.value.problems["model.bin"]
    assert source.bytes_served == 0
    assert not (tmp_path / "model.bin").exists()


async def test_expired_manifest_with_sources_still_boots_degraded(tmp_path: Path) -> None:
    files = {**FILES, "extra.txt": b"optional"}
    signed = signed_for(files, 4096, expires="2026-12-01T00:00:00Z")
    for entry in signed["files"]:
        entry["required"] = entry["path"] != "extra.txt"
    expiring = sign_manifest(parse_manifest({"signed": signed, "signatures": []}), KEY)
    await boot(tmp_path, expiring, [MemorySource(files)], now=datetime(2026, 11, 26, tzinfo=UTC))
    (tmp_path / "extra.txt").unlink()
    source = MemorySource(files)
    store = await boot(tmp_path, expiring, [source], now=datetime(2027, 1, 1, tzinfo=UTC))
    assert store.offline
    assert store.report is not None and store.report.ok
    assert source.bytes_served == 0


async def test_expired_manifest_still_boots_a_verified_store_offline(tmp_path: Path) -> None:
    expiring = sign_manifest(manifest(expires="2026-12-01T00:00:00Z"), KEY)
    await boot(tmp_path, expiring, [MemorySource(FILES)], now=datetime(2026, 11, 26, tzinfo=UTC))
    with capture_logs() as events:
        store = await boot(tmp_path, None, now=datetime(2027, 6, 1, tzinfo=UTC))
    assert store.report is not None and store.report.ok
    assert any(e["event"].startswith("manifest expired") for e in events)


async def test_unsigned_manifests_work_without_keys_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "_warned_unsigned", False)
    no_keys = TrustedKeys({})
    with capture_logs() as events:
        await boot(tmp_path / "a", manifest(), [MemorySource(FILES)], trust=no_keys)
        await boot(tmp_path / "b", manifest(), [MemorySource(FILES)], trust=no_keys)
    warnings = [e for e in events if "signatures are not checked" in e["event"]]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"


async def test_lying_mirror_is_skipped_for_the_rest_of_the_run(tmp_path: Path) -> None:
    def garbage(path: str, offset: int, length: int) -> bytes:
        return b"\x00" * length

    liar = MemorySource(handler=garbage, name="liar")
    good = MemorySource(FILES, name="good")
    with capture_logs() as events:
        store = await boot(
            tmp_path, sign_manifest(manifest(), KEY), [liar, good], repair_concurrency=1
        )
    assert store.report is not None and store.report.ok
    assert (tmp_path / "model.bin").read_bytes() == FILES["model.bin"]
    asked = {path for path, _, _ in liar.requests}
    assert len(asked) == 1  # tried for the first file only, then distrusted
    assert {path for path, _, _ in good.requests} == set(FILES)
    assert any(e["event"] == "source distrusted for the rest of the run" for e in events)


async def test_a_refused_update_leaves_the_manager_on_its_release(tmp_path: Path) -> None:
    await boot(tmp_path, sign_manifest(manifest(serial=1), KEY), [MemorySource(FILES)])
    changed = {**FILES, "model.bin": b"v" * 10_000}
    expired = sign_manifest(manifest(serial=2, files=changed, expires="2026-12-01T00:00:00Z"), KEY)
    later = datetime(2027, 1, 1, tzinfo=UTC)
    store = StorageManager(tmp_path, None, [MemorySource(changed)], trust=TRUST, now=lambda: later)
    try:
        with pytest.raises(SignatureError, match="expired"):
            async for _ in store.update(expired):
                pass
        async for _ in store.verify():
            pass
        assert (await store.manifest()).serial == 1
        assert store.report is not None and store.report.ok
    finally:
        await store.aclose()
