"""Peers end to end: real ``kensho up`` / ``kensho share`` / ``kensho sync`` processes.

A store synced from the origin is shared by ``kensho share``; a second store syncs
with the peer first and the origin second, and the origin sends nothing. ``kensho
up`` serves the chunks of its (demo) store behind its API key.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from _server_support import kensho_env, kensho_up, run_kensho
from _share_support import FILES, kensho_share, sync
from _storage_support import http_server
from kensho.demo import DEMO_MANIFEST, DEMO_MODEL_DIR
from kensho.storage import load_manifest


def test_kensho_share_serves_a_synced_store_and_the_next_store_skips_the_origin(
    tmp_path: Path,
) -> None:
    with http_server(FILES) as (origin, st):
        first = sync(tmp_path, tmp_path / "seed", origin)
        assert first.returncode == 0, first.stderr
        from_origin = st.bytes_served
        assert from_origin == sum(map(len, FILES.values()))
        with kensho_share(tmp_path, tmp_path / "seed") as share:
            url = share.url
            second = sync(tmp_path, tmp_path / "next", f"peer+{url}", origin)
        assert second.returncode == 0, second.stderr
        assert st.bytes_served == from_origin  # not one byte more from the origin
    assert "from peer+http://127.0.0.1:" in second.stderr
    for rel, data in FILES.items():
        assert (tmp_path / "next" / rel).read_bytes() == data


def test_kensho_share_refuses_a_folder_that_holds_no_synced_store(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = run_kensho("share", "--root", tmp_path / "empty", cwd=tmp_path)
    assert r.returncode == 2
    assert "holds no synced store" in r.stderr
    assert "kensho sync" in r.stderr


def test_kensho_up_serves_its_verified_chunks_behind_its_api_key(tmp_path: Path) -> None:
    key = "peer-key-12345"
    env = kensho_env(tmp_path, KENSHO_MODEL_ENGINE="mock", KENSHO_API_KEY=key)
    entry = load_manifest(DEMO_MANIFEST).files[0]
    chunk = entry.chunks[0]
    expected = (DEMO_MODEL_DIR / entry.path).read_bytes()[chunk.offset : chunk.end]
    with kensho_up(env=env, cwd=tmp_path) as server:
        route = f"{server.url}/v1/kensho/chunks/{chunk.sha256}"
        assert httpx.get(route).status_code == 401
        r = httpx.get(route, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert r.content == expected
        missing = httpx.get(
            f"{server.url}/v1/kensho/chunks/{'0' * 64}", headers={"Authorization": f"Bearer {key}"}
        )
        assert missing.status_code == 404
