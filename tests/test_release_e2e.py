"""Over-the-air releases end to end: real ``kensho up`` processes, a real HTTP origin on
127.0.0.1 publishing ``manifest.json`` and counting bytes, SIGKILL mid-prefetch, the
origin gone before the offline apply, and a live apply under a client loop."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from _http_support import server_metric
from _release_support import CHUNK, TRUST_HEX, http, install, manager, published, release
from _server_support import kensho_env, kensho_up
from _storage_support import http_server, kensho
from kensho.demo import DEMO_MODEL_DIR
from kensho.storage import Manifest
from kensho.storage.prefetch import Prefetcher

OLD = os.urandom(48 * CHUNK)
V1 = {"weights.bin": OLD, "config.json": b'{"layers": 2}'}
V2 = {"weights.bin": OLD[: 8 * CHUNK] + os.urandom(32 * CHUNK) + OLD[40 * CHUNK :]}
V2["config.json"] = b'{"layers": 3}'


MODEL = release(V1, 1).name  # the served model id: the manifest's name


def env(home: Path, **extra: str) -> dict[str, str]:
    return kensho_env(
        home,
        **{
            "KENSHO_MODEL_ENGINE": "mock",
            "KENSHO_TRUST_KEYS": TRUST_HEX,
            "KENSHO_STORAGE_UPDATE_INTERVAL": "3600",  # the check at boot; no second one here
            **extra,
        },
    )


def trusted_serial(root: Path) -> int:
    doc = json.loads((root / ".kensho" / "trusted-manifest.json").read_bytes())
    return int(doc["signed"]["serial"])


def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    asyncio.run(install(root, V1, release(V1, 1)))
    return root


def test_up_stages_a_published_release_and_the_next_boot_applies_it_offline(
    tmp_path: Path,
) -> None:
    root = store(tmp_path)
    m2 = release(V2, 2)
    with (
        http_server(published(m2, V2)) as (origin, state),
        kensho_up("--model", str(root), "-s", origin, env=env(tmp_path), cwd=tmp_path) as up,
    ):
        up.wait_for_stderr("release.staged")
        assert server_metric(up.url, "kensho_release_staged_complete") == 1.0
        assert server_metric(up.url, 'kensho_release_serial{release="current"}') == 1.0
        assert server_metric(up.url, 'kensho_release_serial{release="staged"}') == 2.0
        # Still serving the running release, untouched.
        assert (root / "weights.bin").read_bytes() == OLD
        fetched = state.bytes_served
    manifest_size = len(published(m2, V2)["manifest.json"])
    assert fetched <= 32 * CHUNK + len(V2["config.json"]) + manifest_size
    assert trusted_serial(root) == 1
    # The origin is gone: the next boot applies the staged release with no network.
    with kensho_up("--model", str(root), env=env(tmp_path), cwd=tmp_path) as up:
        assert server_metric(up.url, 'kensho_release_serial{release="current"}') == 2.0
        r = httpx.post(
            up.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
    assert trusted_serial(root) == 2
    for rel, data in V2.items():
        assert (root / rel).read_bytes() == data, rel


def _asked(requests: list[tuple[str, str | None]], path: str, size: int) -> int:
    """Bytes of ``path`` asked for by ``requests`` (their ``Range`` headers)."""
    total = 0
    for rel, rng in requests:
        if rel != path:
            continue
        if rng is None:
            total += size
            continue
        start, end = map(int, rng.removeprefix("bytes=").split("-"))
        total += end - start + 1
    return total


def _wait_for_staged_bytes(root: Path, size: int, seconds: float = 20.0) -> None:
    """Until the staged partial files hold ``size`` bytes on disk (allocated blocks)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        parts = (root / ".kensho" / "staging").glob("*.part")
        if sum(p.stat().st_blocks * 512 for p in parts) >= size:
            return
    raise AssertionError(f"fewer than {size} bytes staged in {seconds:g} s")


def test_sigkill_mid_prefetch_then_the_next_run_resumes(tmp_path: Path) -> None:
    mib = 1 << 20
    old = os.urandom(4 * mib)  # 1024 chunks: the writer hands bytes over per MiB
    v1 = {"weights.bin": old}
    v2 = {"weights.bin": old[: mib // 2] + os.urandom(3 * mib) + old[7 * mib // 2 :]}
    root = tmp_path / "store"
    asyncio.run(install(root, v1, release(v1, 1)))
    files = published(release(v2, 2), v2)
    # 1.5 MiB of the changed 3 MiB go out, then the origin pauses; the kill comes once
    # the first MiB of them is written to the staged file, next to the 1 MiB of
    # unchanged chunks copied from the served file.
    pause = len(files["manifest.json"]) + 3 * mib // 2
    with http_server(files, pause_after=pause) as (origin, state):
        with kensho_up("--model", str(root), "-s", origin, env=env(tmp_path), cwd=tmp_path) as up:
            assert state.paused.wait(30), "the prefetch never started"
            _wait_for_staged_bytes(root, 2 * mib)
            up.process.send_signal(signal.SIGKILL)
            assert up.process.wait(30) == -signal.SIGKILL
        with state.lock:
            state.pause_after = None  # the killed run's handler stays paused until the end
        first = len(state.requests)
        assert (root / "weights.bin").read_bytes() == old and trusted_serial(root) == 1
        with kensho_up("--model", str(root), "-s", origin, env=env(tmp_path), cwd=tmp_path) as up:
            up.wait_for_stderr("release.staged")
        again = _asked(state.requests[first:], "weights.bin", len(v2["weights.bin"]))
    assert 0 < again <= 2 * mib, "verified staged chunks were fetched again"
    assert (root / "weights.bin").read_bytes() == old


async def _client_loop(url: str, busy: asyncio.Event, stop: asyncio.Event) -> list[int]:
    """Streaming completions, four at a time, until ``stop``: every status seen.
    ``busy`` is set once each worker has finished one (steady load reached)."""
    statuses: list[int] = []
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello"}],
    }
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def worker() -> None:
            while not stop.is_set():
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    text = "".join([chunk async for chunk in r.aiter_text()])
                    ok = r.status_code == 200 and "[DONE]" in text and '"error"' not in text
                    statuses.append(r.status_code if ok else -r.status_code)
                if len(statuses) >= 4:
                    busy.set()

        await asyncio.gather(*(worker() for _ in range(4)))
    return statuses


async def _apply_under_load(url: str) -> tuple[httpx.Response, list[int]]:
    busy, stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.ensure_future(_client_loop(url, busy, stop))
    async with httpx.AsyncClient(base_url=url, timeout=60) as admin:
        await busy.wait()
        applied = await admin.post("/v1/kensho/update")
    stop.set()
    return applied, await loop


def test_live_apply_under_load_fails_no_request(tmp_path: Path) -> None:
    root = store(tmp_path)
    m2 = release(V2, 2)
    with (
        http_server(published(m2, V2)) as (origin, _),
        kensho_up("--model", str(root), "-s", origin, env=env(tmp_path), cwd=tmp_path) as up,
    ):
        up.wait_for_stderr("release.staged")
        response, statuses = asyncio.run(_apply_under_load(up.url))
        assert response.status_code == 200, response.text
        assert response.json()["applied"] is True and response.json()["serial"] == 2
        assert server_metric(up.url, 'kensho_release_serial{release="current"}') == 2.0
        assert server_metric(up.url, "kensho_release_staged_complete") == 0.0
    assert statuses and all(s == 200 for s in statuses), statuses
    assert trusted_serial(root) == 2
    for rel, data in V2.items():
        assert (root / rel).read_bytes() == data, rel


def test_kensho_sync_applies_the_staged_release_with_the_origin_gone(tmp_path: Path) -> None:
    root = store(tmp_path)
    with http_server(V2) as (origin, _):
        asyncio.run(_stage(root, release(V2, 2), origin))
    done = kensho("sync", "-r", str(root), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)["kind"] for line in done.stdout.splitlines()]
    assert "release.applied" in kinds and kinds[-1] == "storage.ready"
    assert trusted_serial(root) == 2
    for rel, data in V2.items():
        assert (root / rel).read_bytes() == data, rel


async def _stage(root: Path, manifest: Manifest, origin: str) -> None:
    async with manager(root, [http(origin)]) as store_manager:
        result = await Prefetcher(store_manager, emit=lambda _: None).stage(manifest)
    assert result.outcome == "staged"


def test_up_refuses_a_badly_signed_release_and_never_stages_it(tmp_path: Path) -> None:
    root = store(tmp_path)
    forged = release(V2, 2, key=None)  # unsigned: the pinned key did not sign it
    with (
        http_server(published(forged, V2)) as (origin, state),
        kensho_up("--model", str(root), "-s", origin, env=env(tmp_path), cwd=tmp_path) as up,
    ):
        line = json.loads(up.wait_for_stderr("release.refused"))
        assert line["level"] == "warning" and line["serial"] == 2
        assert server_metric(up.url, 'kensho_release_serial{release="current"}') == 1.0
        assert server_metric(up.url, 'kensho_release_serial{release="staged"}') == 0.0
        assert [p for p, _ in state.requests] == ["manifest.json"], "nothing was fetched"
    assert trusted_serial(root) == 1 and (root / "weights.bin").read_bytes() == OLD
    assert not list((root / ".kensho").glob("staging/*.part"))


DEMO_GGUF = (DEMO_MODEL_DIR / "model.gguf").read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
def test_a_release_that_cannot_load_at_boot_is_rolled_back_and_never_staged_again(
    tmp_path: Path,
) -> None:
    """Release 2 is staged by an earlier run; its GGUF is not a model. The next boot
    applies it offline, no engine loads it: the previous files and trusted release come
    back, the engines start on them and serve, and release 2 is never staged again."""
    good = {"model.gguf": DEMO_GGUF}
    broken = {"model.gguf": b"GGUF" + os.urandom(len(DEMO_GGUF) - 4)}
    root = tmp_path / "store"
    asyncio.run(install(root, good, release(good, 1)))
    m2 = release(broken, 2)
    with http_server(broken) as (origin, _):
        asyncio.run(_stage(root, m2, origin))
    llama = env(tmp_path, KENSHO_MODEL_ENGINE="llama")
    with kensho_up("--model", str(root), env=llama, cwd=tmp_path) as up:
        failed = json.loads(up.wait_for_stderr("release.apply.failed"))
        assert failed["target_serial"] == 2 and failed["serial"] == 1
        assert "could not load release 2" in failed["reason"]
        assert server_metric(up.url, 'kensho_release_serial{release="current"}') == 1.0
        r = httpx.post(
            up.url + "/v1/completions",
            json={"model": MODEL, "prompt": "The GPU", "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    assert trusted_serial(root) == 1
    assert (root / "model.gguf").read_bytes() == DEMO_GGUF
    assert not (root / ".kensho" / "previous").exists()
    asyncio.run(_refused_again(root, m2))


async def _refused_again(root: Path, manifest: Manifest) -> None:
    async with manager(root, []) as store_manager:
        result = await Prefetcher(store_manager, emit=lambda _: None).stage(manifest)
    assert result.outcome == "stopped" and "failed to load on this device" in result.detail
