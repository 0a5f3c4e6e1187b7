"""Kernel boot: integrity before engines, repair from mirrors, degraded mode, shutdown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kensho.config import ModelSettings, Settings, ShareSettings, StorageSettings
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import IntegrityError
from kensho.events import Event, StorageReady
from kensho.kernel import Kernel
from kensho.runtime.engines.base import GenerationRequest
from kensho.server import IntegrityState
from kensho.storage import build_manifest, dump_manifest
from kensho.storage.report import IntegrityStatus


def settings(root: Path, **model: object) -> Settings:
    return Settings(
        storage=StorageSettings(root=root),
        model=ModelSettings(**model),  # type: ignore[arg-type]
    )


async def make_store(tmp_path: Path, *, optional: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A copy of the demo model as a store of its own, with its manifest beside it."""
    store = tmp_path / "store"
    shutil.copytree(DEMO_MODEL_DIR, store)
    manifest = await build_manifest(
        store, name="custom", version="1.0.0", chunk_size=128 * 1024, optional=optional
    )
    path = tmp_path / "manifest.json"
    path.write_bytes(dump_manifest(manifest))
    return store, path


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


async def test_demo_boot_fills_the_store_then_serves(tmp_path: Path) -> None:
    seen: list[Event] = []
    kernel = Kernel(settings(tmp_path), on_event=seen.append)
    try:
        ctx = await kernel.boot()
        assert kernel.uses_demo
        assert (tmp_path / "demo" / "model.safetensors").is_file()
        assert ctx.integrity.status == "ok"
        assert ctx.integrity.files == {"ok": 8}
        assert any(isinstance(e, StorageReady) for e in seen)
        assert kernel.runtime is not None
        assert kernel.runtime.hub.history[0].kind == "storage.verify.started"
        assert kernel.executor is not None
        request = GenerationRequest.chat([("user", "Say hello.")], max_tokens=60, temperature=0)
        answer = await kernel.executor.submit(request).result()
        assert "Hello! I am the tiny demo model of Kensho." in answer
    finally:
        await kernel.shutdown()


async def test_corrupt_weights_are_refused_until_repaired(tmp_path: Path) -> None:
    store, manifest = await make_store(tmp_path)
    flip_byte(store / "model.safetensors")
    cfg = settings(tmp_path / "unused", dir=store)
    cfg = cfg.model_copy(update={"storage": StorageSettings(root=tmp_path, manifest=manifest)})
    kernel = Kernel(cfg)
    with pytest.raises(IntegrityError) as info:
        await kernel.boot()
    await kernel.shutdown()
    assert list(info.value.problems) == ["model.safetensors"]
    assert "corrupt" in info.value.problems["model.safetensors"]
    assert kernel.runtime is None  # no engine ever saw the corrupt weights

    repaired = cfg.model_copy(
        update={
            "storage": StorageSettings(
                root=tmp_path, manifest=manifest, sources=[str(DEMO_MODEL_DIR)]
            )
        }
    )
    kernel = Kernel(repaired)
    try:
        ctx = await kernel.boot()
        assert ctx.integrity.status == "ok"
        assert kernel.executor is not None
        text = await kernel.executor.submit(
            GenerationRequest(prompt="The GPU", max_tokens=4, temperature=0)
        ).result()
        assert text.startswith(" is fast")
    finally:
        await kernel.shutdown()


async def test_missing_optional_file_boots_in_degraded_mode(tmp_path: Path) -> None:
    store, manifest = await make_store(tmp_path, optional=("chat_template.jinja",))
    (store / "chat_template.jinja").unlink()
    cfg = settings(tmp_path, dir=store, engine="mock")
    cfg = cfg.model_copy(update={"storage": StorageSettings(root=tmp_path, manifest=manifest)})
    kernel = Kernel(cfg)
    try:
        ctx = await kernel.boot()
        assert ctx.integrity.status == "degraded"
        assert ctx.integrity.problems == {"chat_template.jinja": "missing"}
        assert ctx.integrity.offline is True
    finally:
        await kernel.shutdown()


async def test_admin_verify_finds_corruption_after_boot(tmp_path: Path) -> None:
    kernel = Kernel(settings(tmp_path, engine="mock"))
    try:
        ctx = await kernel.boot()
        flip_byte(tmp_path / "demo" / "tokenizer.json")
        assert ctx.verify is not None
        state = await ctx.verify()
        assert state.status == "failed"
        assert state.problems == {"tokenizer.json": "corrupt"}
        json.dumps(state.to_dict())  # what the admin endpoint returns is JSON-ready
    finally:
        await kernel.shutdown()


async def test_one_hub_carries_storage_events_as_they_happen_before_any_runtime(
    tmp_path: Path,
) -> None:
    kernel = Kernel(settings(tmp_path, engine="mock"))
    arrived: list[tuple[str, bool]] = []  # (kind, a runtime existed when it arrived)
    kernel.hub.add_listener(lambda e: arrived.append((e.kind, kernel.runtime is not None)))
    try:
        ctx = await kernel.boot()
        assert kernel.runtime is not None
        assert kernel.executor is not None
        assert kernel.storage.hub is kernel.hub
        assert kernel.runtime.hub is kernel.hub
        assert kernel.executor.hub is kernel.hub
        assert ctx.hub is kernel.hub
        storage = [had_runtime for kind, had_runtime in arrived if kind.startswith("storage.")]
        assert storage, "the storage events went through the kernel's hub"
        assert not any(storage), "storage events reach the hub at once, not buffered for later"
        kernel.runtime.primary_breaker.force_open("maintenance")
        assert ("breaker.state_changed", True) in arrived
        assert ("runtime.fallback_activated", True) in arrived
    finally:
        await kernel.shutdown()


def test_integrity_state_holds_one_of_the_storage_verdicts() -> None:
    assert IntegrityState().status is IntegrityStatus.UNVERIFIED
    assert IntegrityState(status="failed").status is IntegrityStatus.FAILED  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'broken' is not a valid IntegrityStatus"):
        IntegrityState(status="broken")  # type: ignore[arg-type]


async def test_the_served_chunks_follow_the_last_check_and_sharing_can_be_off(
    tmp_path: Path,
) -> None:
    kernel = Kernel(settings(tmp_path, engine="mock"))
    try:
        ctx = await kernel.boot()
        assert ctx.chunks is not None
        manifest = await kernel.storage.manifest()
        tokenizer = manifest.file("tokenizer.json")
        assert tokenizer is not None
        sha = tokenizer.chunks[0].sha256
        assert ctx.chunks.shelf.find(sha) is not None
        flip_byte(tmp_path / "demo" / "tokenizer.json")
        assert ctx.verify is not None
        await ctx.verify()  # the check fails: its record goes, so does the chunk
        assert ctx.chunks.shelf.find(sha) is None
    finally:
        await kernel.shutdown()
    off = settings(tmp_path, engine="mock").model_copy(
        update={"share": ShareSettings(enabled=False)}
    )
    kernel = Kernel(off)
    try:
        assert (await kernel.boot()).chunks is None
    finally:
        await kernel.shutdown()
