"""The release loop on virtual time, the release status, and the live apply's rollback
(real store, real HTTP origin, real runtime manager over fault-injecting engines)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _release_support import CHUNK, Recorder, http, install, manager, published, release
from _storage_support import http_server
from kensho._live_apply import LiveApplier
from kensho.errors import EngineError, EngineUnavailableError
from kensho.events import (
    ReleaseApplied,
    ReleaseApplyFailed,
    ReleaseChecked,
    ReleasePrefetchProgress,
    ReleasePrefetchStopped,
    ReleaseStaged,
)
from kensho.hub import EventHub
from kensho.runtime.breaker import BreakerState
from kensho.runtime.engines.faulty import FaultyEngine
from kensho.runtime.manager import RuntimeManager
from kensho.storage import StorageManager
from kensho.storage.prefetch import Prefetcher, Staging, apply_staged
from kensho.storage.updates import JITTER, ReleaseStatus, ReleaseUpdater

V1 = {"w.bin": os.urandom(8 * CHUNK), "config.json": b'{"layers": 2}'}
V2 = {"w.bin": V1["w.bin"][: 4 * CHUNK] + os.urandom(4 * CHUNK), "config.json": b'{"layers": 3}'}


def trusted_serial(root: Path) -> int:
    doc = json.loads((root / ".kensho" / "trusted-manifest.json").read_bytes())
    return int(doc["signed"]["serial"])


class _Stop(Exception):
    """Raised by the virtual sleep to end the loop after a number of polls."""


async def test_polls_at_boot_then_every_jittered_interval_on_virtual_time(
    tmp_path: Path,
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    delays: list[float] = []
    draws = iter([0.0, 0.5, 0.999, 0.25])

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 4:
            raise _Stop

    seen = Recorder()
    with http_server(published(release(V1, 1), V1)) as (url, state):
        store = manager(tmp_path, [http(url)])
        updater = ReleaseUpdater(
            store, interval=600, emit=seen, sleep=sleep, jitter=lambda: next(draws)
        )
        with pytest.raises(_Stop):
            await updater.run()
        await store.aclose()
        assert [r for r, _ in state.requests] == ["manifest.json"] * 4
        assert state.statuses == [200, 304, 304, 304]
    assert delays == pytest.approx([450.0, 600.0, 749.7, 525.0])
    assert all(600 * (1 - JITTER) <= d <= 600 * (1 + JITTER) for d in delays)
    assert [c.result for c in seen.of(ReleaseChecked)] == ["current"] + ["unchanged"] * 3


async def test_a_release_published_between_polls_is_staged_then_applied_live(
    tmp_path: Path,
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    seen = Recorder()
    applied: list[int] = []
    with http_server(published(release(V1, 1), V1)) as (url, state):
        store = manager(tmp_path, [http(url)])

        async def apply() -> None:
            applied.append(1)

        updater = ReleaseUpdater(store, interval=60, emit=seen, auto_apply=True, apply=apply)
        assert (await updater.check_now()).result == "current"
        with state.lock:
            state.files.update(published(release(V2, 2), V2))
        assert (await updater.check_now()).result == "new"
        await store.aclose()
    assert [e.serial for e in seen.of(ReleaseStaged)] == [2]
    assert applied == [1], "auto_apply hands a staged release to the live apply once"


def test_release_status_folds_the_release_events() -> None:
    status = ReleaseStatus(current_serial=1, auto_apply=False)
    status.observe(ReleaseChecked(result="new", source="s", serial=2, current_serial=1))
    status.observe(ReleasePrefetchProgress(serial=2, done=10, total=40))
    snap = status.snapshot()
    assert (snap.staged_serial, snap.staged_done, snap.staged_total) == (2, 10, 40)
    assert snap.last_check_result == "new" and not snap.staged_complete
    status.observe(ReleaseStaged(serial=2, version="1.2", files=1, fetched=40, reused=0))
    assert status.snapshot().staged_complete and status.snapshot().staged_done == 40
    status.observe(ReleaseApplied(serial=2, previous_serial=1, how="live"))
    snap = status.snapshot()
    assert snap.current_serial == 2 and snap.staged_serial is None
    status.observe(ReleaseApplyFailed(target_serial=2, serial=1, reason="rolled back"))
    assert status.snapshot().current_serial == 1


class _ConfigReadingEngine(FaultyEngine):
    """An engine that reads the store's config at load, and cannot load 3 layers."""

    def __init__(self, root: Path, name: str, kind: str) -> None:
        super().__init__(name, kind)  # type: ignore[arg-type]
        self.root = root
        self.loads: list[bytes] = []

    async def load(self) -> None:
        config = (self.root / "config.json").read_bytes()
        self.loads.append(config)
        if b'"layers": 3' in config:
            raise EngineUnavailableError(f"{self.name}: 3 layers are not supported")
        await super().load()


async def test_a_release_that_fails_to_load_is_rolled_back_and_not_staged_again(
    tmp_path: Path,
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    m2 = release(V2, 2)
    with http_server(V2) as (url, _):
        store = manager(tmp_path, [http(url)])
        assert (await Prefetcher(store, emit=Recorder()).stage(m2)).outcome == "staged"
        primary = _ConfigReadingEngine(tmp_path, "gpu", "gpu")
        fallback = _ConfigReadingEngine(tmp_path, "cpu", "cpu")
        hub = EventHub()
        seen = Recorder()
        hub.add_listener(seen)
        async with RuntimeManager(primary, fallback, hub=hub) as runtime:
            applier = LiveApplier(store, lambda: runtime, lambda: None, hub)
            with pytest.raises(EngineError, match="3 layers"):
                await applier.apply(how="live")
            # The old files serve again, on both engines, breakers closed.
            assert runtime.primary_breaker.state == BreakerState.CLOSED
            assert runtime.fallback_breaker is not None
            assert runtime.fallback_breaker.state == BreakerState.CLOSED
        assert primary.loads[-1] == V1["config.json"]
        for rel, data in V1.items():
            assert (tmp_path / rel).read_bytes() == data, rel
        assert trusted_serial(tmp_path) == 1
        assert store.report is not None and store.report.ok
        (failed,) = seen.of(ReleaseApplyFailed)
        assert failed.target_serial == 2 and failed.serial == 1
        again = Recorder()
        result = await Prefetcher(store, emit=again).stage(m2)
        await store.aclose()
    assert result.outcome == "stopped"
    assert "failed to load on this device" in again.of(ReleasePrefetchStopped)[0].detail
    assert not (tmp_path / ".kensho" / "previous").exists()
    assert Staging(store.state).complete() is None


async def test_live_apply_reloads_each_engine_behind_its_breaker(tmp_path: Path) -> None:
    await install(tmp_path, V1, release(V1, 1))
    v2 = {**V2, "config.json": V1["config.json"]}  # loads fine
    with http_server(v2) as (url, _):
        store = manager(tmp_path, [http(url)])
        assert (await Prefetcher(store, emit=Recorder()).stage(release(v2, 2))).outcome == "staged"
    primary = _ConfigReadingEngine(tmp_path, "gpu", "gpu")
    fallback = _ConfigReadingEngine(tmp_path, "cpu", "cpu")
    hub = EventHub()
    transitions: list[tuple[str, str]] = []
    async with RuntimeManager(primary, fallback, hub=hub) as runtime:
        for breaker in (runtime.primary_breaker, runtime.fallback_breaker):
            assert breaker is not None
            breaker.add_listener(lambda e: transitions.append((e.breaker, e.to_state)))
        applied = await LiveApplier(store, lambda: runtime, lambda: None, hub).apply(how="live")
    await store.aclose()
    assert applied is not None and applied.serial == 2
    assert transitions == [
        ("gpu", "forced_open"),
        ("gpu", "closed"),
        ("cpu", "forced_open"),
        ("cpu", "closed"),
    ], "one engine at a time: the other serves meanwhile"
    assert len(primary.loads) == len(fallback.loads) == 2
    assert (tmp_path / "w.bin").read_bytes() == v2["w.bin"]
    assert not (tmp_path / ".kensho" / "previous").exists()


async def _staged_store(root: Path, files: dict[str, bytes]) -> StorageManager:
    """A store on release 1 with release 2 (``files``) fully staged."""
    await install(root, V1, release(V1, 1))
    with http_server(files) as (url, _):
        store = manager(root, [http(url)])
        assert (await Prefetcher(store, emit=Recorder()).stage(release(files, 2))).outcome == (
            "staged"
        )
    return store


async def test_a_primary_without_a_device_does_not_roll_back_a_live_apply(
    tmp_path: Path,
) -> None:
    v2 = {**V2, "config.json": V1["config.json"]}  # loads fine
    store = await _staged_store(tmp_path, v2)
    primary = FaultyEngine("gpu", "gpu")
    primary.fail_load(permanent=True)  # no CUDA here: forced open at start
    fallback = _ConfigReadingEngine(tmp_path, "cpu", "cpu")
    hub = EventHub()
    seen = Recorder()
    hub.add_listener(seen)
    async with RuntimeManager(primary, fallback, hub=hub) as runtime:
        applied = await LiveApplier(store, lambda: runtime, lambda: None, hub).apply(how="live")
        assert runtime.primary_breaker.state == BreakerState.FORCED_OPEN
    await store.aclose()
    assert applied is not None and applied.serial == 2
    assert not seen.of(ReleaseApplyFailed), "the missing GPU is not the release's fault"
    assert fallback.loads[-1] == v2["config.json"] and trusted_serial(tmp_path) == 2


async def test_boot_rolls_back_a_release_an_engine_cannot_load_and_starts_on_the_previous(
    tmp_path: Path,
) -> None:
    store = await _staged_store(tmp_path, V2)  # 3 layers: the primary cannot load it
    assert await apply_staged(store, how="boot", emit=Recorder(), keep=True) is not None
    engines: list[_ConfigReadingEngine] = []
    hub = EventHub()
    seen = Recorder()
    hub.add_listener(seen)

    def make() -> RuntimeManager:
        primary = _ConfigReadingEngine(tmp_path, "gpu", "gpu")
        engines.append(primary)
        return RuntimeManager(primary, FaultyEngine("cpu", "cpu"), hub=hub)

    runtime = await LiveApplier(store, lambda: None, lambda: None, hub).start_runtime(make)
    try:
        assert runtime.primary_breaker.state == BreakerState.CLOSED
        assert not runtime.degraded
    finally:
        await runtime.close()
        await store.aclose()
    assert [e.loads for e in engines] == [[V2["config.json"]], [V1["config.json"]]]
    (failed,) = seen.of(ReleaseApplyFailed)
    assert failed.target_serial == 2 and failed.serial == 1 and "3 layers" in failed.reason
    for rel, data in V1.items():
        assert (tmp_path / rel).read_bytes() == data, rel
    assert trusted_serial(tmp_path) == 1
    assert not (tmp_path / ".kensho" / "previous").exists()
    assert Staging(store.state).failed(), "the release is remembered as failed"


async def test_boot_confirms_a_release_its_engines_load_and_drops_the_kept_files(
    tmp_path: Path,
) -> None:
    v2 = {**V2, "config.json": V1["config.json"]}  # loads fine
    store = await _staged_store(tmp_path, v2)
    assert await apply_staged(store, how="boot", emit=Recorder(), keep=True) is not None
    assert (tmp_path / ".kensho" / "previous").exists()
    hub = EventHub()
    seen = Recorder()
    hub.add_listener(seen)

    def make() -> RuntimeManager:
        return RuntimeManager(_ConfigReadingEngine(tmp_path, "gpu", "gpu"), hub=hub)

    runtime = await LiveApplier(store, lambda: None, lambda: None, hub).start_runtime(make)
    await runtime.close()
    await store.aclose()
    assert not seen.of(ReleaseApplyFailed) and trusted_serial(tmp_path) == 2
    assert not (tmp_path / ".kensho" / "previous").exists()


async def test_at_boot_with_no_release_on_trial_an_engine_failure_is_raised(
    tmp_path: Path,
) -> None:
    await install(tmp_path, V1, release(V1, 1))
    store = manager(tmp_path, [])
    broken = FaultyEngine("gpu", "gpu")
    broken.fail_load()
    with pytest.raises(EngineUnavailableError, match="no inference engine could start"):
        await LiveApplier(store, lambda: None, lambda: None, EventHub()).start_runtime(
            lambda: RuntimeManager(broken, hub=EventHub())
        )
    await store.aclose()
    assert trusted_serial(tmp_path) == 1
