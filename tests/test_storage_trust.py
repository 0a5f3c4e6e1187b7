"""Signed manifests in the store: k-of-n trust, rollback, freeze, lying mirrors.

The last part runs real ``kensho`` processes: races for the store lock (ordered by a
paused HTTP download or a lock the test holds, never by sleeping) and pinned keys.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from filelock import FileLock

from _server_support import kensho_popen
from _storage_support import http_server, kensho, signed_for, write_tree
from kensho.errors import IntegrityError, SignatureError
from kensho.storage import MemorySource, Source, StorageManager, dump_manifest, parse_manifest
from kensho.storage import release as release_module
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
    monkeypatch.setattr(release_module, "_warned_unsigned", False)
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


async def test_a_damaged_key_pin_refuses_every_manifest(tmp_path: Path) -> None:
    await boot(tmp_path, sign_manifest(manifest(), KEY), [MemorySource(FILES)])
    pin = tmp_path / ".kensho" / "trusted-keys.json"
    pin.write_text("{not json")
    with pytest.raises(SignatureError, match=r"trusted-keys\.json is damaged"):
        await boot(tmp_path, sign_manifest(manifest(), KEY), trust=TrustedKeys({}))


# --- real processes --------------------------------------------------------------------

V1 = {"models/w.bin": os.urandom(300_000), "tok.json": b'{"vocab": 3}'}
V2 = {**V1, "models/w.bin": os.urandom(300_000)}
CLI_CHUNK = 65_536


def publish(path: Path, files: dict[str, bytes], serial: int, *keys: Ed25519PrivateKey) -> Path:
    """Write a manifest of ``files`` signed by ``keys`` (none: unsigned) to ``path``."""
    release = parse_manifest(
        {"signed": signed_for(files, CLI_CHUNK, serial=serial), "signatures": []}
    )
    for key in keys:
        release = sign_manifest(release, key)
    path.write_bytes(dump_manifest(release))
    return path


def trusting(folder: Path, *keys: Ed25519PrivateKey, threshold: int = 1) -> Path:
    """A working directory whose ``kensho.toml`` trusts ``keys`` (none: no [trust])."""
    folder.mkdir(parents=True, exist_ok=True)
    if keys:
        listed = ", ".join(f'"{public_key_hex(k.public_key())}"' for k in keys)
        text = f"[trust]\nkeys = [{listed}]\nthreshold = {threshold}\n"
        (folder / "kensho.toml").write_text(text)
    return folder


def trusted_serial(root: Path) -> int:
    doc = json.loads((root / ".kensho" / "trusted-manifest.json").read_bytes())
    return int(doc["signed"]["serial"])


def pinned_keys(root: Path) -> list[str]:
    return list(json.loads((root / ".kensho" / "trusted-keys.json").read_bytes())["keys"])


def store_holds(root: Path, files: dict[str, bytes]) -> bool:
    return all((root / rel).read_bytes() == data for rel, data in files.items())


@contextmanager
def sync_process(*args: str | Path, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """``kensho sync ... --json`` in the background, its events on stdout."""
    with kensho_popen(
        "sync", *args, "--json", cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def wait_for_lock(process: subprocess.Popen[str]) -> None:
    """Read the process's events until it says it waits for the store lock."""
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line)["kind"] == "storage.lock.waiting":
            return
    raise AssertionError(f"never waited for the lock: {process.communicate()[1]}")


@pytest.fixture
def signed_store(tmp_path: Path) -> tuple[Path, Path, dict[str, Path]]:
    """A store synced to a signed v1 (trust settings in ``cfg``); (root, cfg, files)."""
    cfg = trusting(tmp_path / "cfg", KEY)
    write_tree(tmp_path / "v1", V1)
    paths = {
        "v1": tmp_path / "v1",
        "m1": publish(tmp_path / "m1.json", V1, 1, KEY),
        "m2": publish(tmp_path / "m2.json", V2, 2, KEY),
    }
    root = tmp_path / "store"
    first = kensho("sync", "-m", paths["m1"], "-r", root, "-s", paths["v1"], cwd=cfg)
    assert first.returncode == 0, first.stderr
    return root, cfg, paths


@pytest.mark.parametrize("late", ["older manifest", "trusted manifest"])
def test_a_sync_that_waited_for_an_update_never_rolls_the_store_back(
    signed_store: tuple[Path, Path, dict[str, Path]], late: str
) -> None:
    """An update to serial 2 holds the lock while a late sync (of the signed v1, or of
    the trusted manifest) waits behind it with a file to repair. Under the lock the late
    sync re-reads the trusted state: v1 is refused as a rollback (exit 6), the trusted-
    manifest sync repairs against v2 (exit 0); either way the store stays on v2."""
    root, cfg, paths = signed_store
    manifest_args = ["-m", paths["m1"]] if late == "older manifest" else []
    with (
        http_server(V2, pause_after=100_000) as (url, server),
        sync_process("-m", paths["m2"], "-r", root, "-s", url, cwd=cfg) as update,
    ):
        assert server.paused.wait(30), "the update never started downloading"
        (root / "tok.json").unlink()  # the late sync now has something to repair
        with sync_process(*manifest_args, "-r", root, "-s", paths["v1"], cwd=cfg) as sync:
            wait_for_lock(sync)
            server.resume.set()
            _, update_err = update.communicate(timeout=50)
            assert update.returncode == 0, update_err
            _, sync_err = sync.communicate(timeout=50)
    if late == "older manifest":
        assert sync.returncode == 6, sync_err
        assert "rollback refused" in sync_err and "serial 1" in sync_err
    else:
        assert sync.returncode == 0, sync_err
    assert store_holds(root, V2)
    assert trusted_serial(root) == 2
    checked = kensho("verify", "-r", root, cwd=cfg)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_two_identical_updates_at_once_both_succeed(
    signed_store: tuple[Path, Path, dict[str, Path]],
) -> None:
    """Both decide to update 1 -> 2 while the test holds the lock; the one that gets it
    second finds the store exactly at serial 2 and only verifies it (exit 0)."""
    root, cfg, paths = signed_store
    args = ("-m", paths["m2"], "-r", root)
    lock = FileLock(root / ".kensho" / "lock")
    with http_server(V2) as (url, server):
        lock.acquire()
        try:
            with (
                sync_process(*args, "-s", url, cwd=cfg) as first,
                sync_process(*args, "-s", url, cwd=cfg) as second,
            ):
                wait_for_lock(first)
                wait_for_lock(second)
                lock.release()
                outcomes = [(*p.communicate(timeout=50), p.returncode) for p in (first, second)]
        finally:
            if lock.is_locked:
                lock.release()
        served = server.bytes_served
    for _, err, code in outcomes:
        assert code == 0, err
    assert served == len(V2["models/w.bin"])  # fetched once, by the first update only
    assert store_holds(root, V2) and trusted_serial(root) == 2


def test_pinned_keys_are_enforced_by_a_run_without_trust_settings(
    signed_store: tuple[Path, Path, dict[str, Path]], tmp_path: Path
) -> None:
    root, _, paths = signed_store
    assert pinned_keys(root) == [public_key_hex(KEY.public_key())]
    bare = trusting(tmp_path / "elsewhere")  # no kensho.toml: no [trust] settings
    write_tree(tmp_path / "v2", V2)
    for name, keys in {"unsigned": (), "foreign": (generate_private_key(),)}.items():
        release = publish(tmp_path / f"{name}.json", V2, 2, *keys)
        done = kensho("sync", "-m", release, "-r", root, "-s", tmp_path / "v2", cwd=bare)
        assert done.returncode == 6, done.stdout + done.stderr
        assert "0 valid signature(s) from keys trusted by the store (pinned in" in done.stderr
        assert store_holds(root, V1) and trusted_serial(root) == 1
    offline = kensho("verify", "-r", root, cwd=bare)  # the trusted v1 passes the pin
    assert offline.returncode == 0, offline.stderr
    signed = kensho("sync", "-m", paths["m2"], "-r", root, "-s", tmp_path / "v2", cwd=bare)
    assert signed.returncode == 0, signed.stderr
    assert store_holds(root, V2) and trusted_serial(root) == 2


def test_a_key_rotation_needs_a_manifest_signed_by_the_pinned_keys_too(
    signed_store: tuple[Path, Path, dict[str, Path]], tmp_path: Path
) -> None:
    root, _, _ = signed_store
    new_key = generate_private_key()
    rotated = trusting(tmp_path / "rotated", new_key)
    bare = trusting(tmp_path / "elsewhere")
    write_tree(tmp_path / "v2", V2)
    source = tmp_path / "v2"
    new_only = publish(tmp_path / "new-only.json", V2, 2, new_key)
    refused = kensho("sync", "-m", new_only, "-r", root, "-s", source, cwd=rotated)
    assert refused.returncode == 6, refused.stderr
    assert "a key change is accepted only from a manifest signed by the pinned" in refused.stderr
    assert trusted_serial(root) == 1 and pinned_keys(root) == [public_key_hex(KEY.public_key())]
    both = publish(tmp_path / "both.json", V2, 2, KEY, new_key)
    done = kensho("sync", "-m", both, "-r", root, "-s", source, cwd=rotated)
    assert done.returncode == 0, done.stderr
    assert pinned_keys(root) == [public_key_hex(new_key.public_key())]
    # The old key was rotated out: it no longer signs anything for this store.
    old_only = publish(tmp_path / "old-only.json", V1, 3, KEY)
    stale = kensho("sync", "-m", old_only, "-r", root, "-s", tmp_path / "v1", cwd=bare)
    assert stale.returncode == 6, stale.stderr
    assert store_holds(root, V2) and trusted_serial(root) == 2
    fresh = publish(tmp_path / "fresh.json", V1, 3, new_key)
    done = kensho("sync", "-m", fresh, "-r", root, "-s", tmp_path / "v1", cwd=bare)
    assert done.returncode == 0, done.stderr
    assert store_holds(root, V1) and trusted_serial(root) == 3


async def test_from_settings_wires_root_manifest_sources_and_keys(tmp_path: Path) -> None:
    """One wiring for the kernel and the CLI: each setting reaches the manager."""
    from kensho.config import Settings, StorageSettings, TrustSettings

    mirror, root = tmp_path / "mirror", tmp_path / "store"
    write_tree(mirror, FILES)
    path = tmp_path / "manifest.json"
    path.write_bytes(dump_manifest(sign_manifest(manifest(), KEY)))
    settings = Settings(
        storage=StorageSettings(root=root, manifest=path, sources=[str(mirror)]),
        trust=TrustSettings(keys=[public_key_hex(KEY.public_key())]),
    )
    async with StorageManager.from_settings(settings) as store:
        assert store.given_manifest is not None and store.given_manifest.serial == 1
        async for _ in store.initialize_and_verify():
            pass
    assert (root / "model.bin").read_bytes() == FILES["model.bin"]
    assert (root / ".kensho" / "trusted-keys.json").exists()  # the [trust] keys were pinned

    other = tmp_path / "other"
    async with StorageManager.from_settings(settings, root=other, sources=[]) as store:
        with pytest.raises(IntegrityError, match="no source to repair it from"):
            async for _ in store.initialize_and_verify():
                pass
    assert not (other / "model.bin").exists()

    path.write_bytes(dump_manifest(manifest()))  # unsigned: the configured keys refuse it
    async with StorageManager.from_settings(settings, root=tmp_path / "third") as store:
        with pytest.raises(SignatureError):
            async for _ in store.initialize_and_verify():
                pass
