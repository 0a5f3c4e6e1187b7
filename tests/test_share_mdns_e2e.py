"""Peers on the LAN end to end: real ``kensho share --announce``, ``kensho up`` with
``[share] announce``, ``kensho sync -s peer+mdns://`` processes, and real mDNS.

These use the product's own service type (``_kensho-chunks._tcp.local.``), so they
may hear each other when run side by side: each looks for the port of the server
it started, and a sync that hears a stranger's store only gets its 404s.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from zeroconf import ServiceStateChange

from _mdns_support import watching
from _server_support import (
    clean_env,
    kensho_env,
    kensho_up,
    run_kensho,
)
from _share_support import FILES, kensho_share, sync
from _storage_support import http_server
from kensho.storage.sources.mdns import SERVICE_TYPE

pytestmark = pytest.mark.slow


def test_kensho_share_announce_is_heard_on_the_lan_and_withdrawn_at_sigterm(
    tmp_path: Path,
) -> None:
    with http_server(FILES) as (origin, _):
        assert sync(tmp_path, tmp_path / "seed", origin).returncode == 0
    with watching(SERVICE_TYPE) as watcher:
        with kensho_share(tmp_path, tmp_path / "seed", "--announce") as server:
            port = int(server.url.rsplit(":", 1)[1])
            info = watcher.wait_for_port(SERVICE_TYPE, port)
            assert info.parsed_addresses() == ["127.0.0.1"]  # bound to loopback: heard here only
            assert info.properties[b"v"] == b"1"
            assert info.properties[b"auth"] == b"none"
            server.wait_for_stderr("announced on the LAN")
            assert server.stop(signal.SIGTERM) == 0
        watcher.wait_for(ServiceStateChange.Removed, lambda name: name == info.name, 10.0)
    assert any("announcement withdrawn" in line for line in server.stderr)


def test_kensho_share_announce_on_a_taken_port_never_announces(tmp_path: Path) -> None:
    with http_server(FILES) as (origin, _):
        assert sync(tmp_path, tmp_path / "seed", origin).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ["share", "--root", str(tmp_path / "seed"), "--port", port, "--announce"]
        r = run_kensho(*args, env=kensho_env(tmp_path / "data", port=None), cwd=tmp_path)
    assert r.returncode == 10, r.stderr
    assert "announc" not in r.stderr  # the whole log of the run: it never started announcing


def test_kensho_sync_finds_the_announced_share_and_skips_the_origin(tmp_path: Path) -> None:
    with http_server(FILES) as (origin, st):
        assert sync(tmp_path, tmp_path / "seed", origin).returncode == 0
        from_origin = st.bytes_served
        with (
            watching(SERVICE_TYPE) as watcher,
            kensho_share(tmp_path, tmp_path / "seed", "--announce") as share,
        ):
            port = int(share.url.rsplit(":", 1)[1])
            watcher.wait_for_port(SERVICE_TYPE, port)  # announced: a browse now hears it
            second = sync(tmp_path, tmp_path / "next", "peer+mdns://", origin)
        assert second.returncode == 0, second.stderr
        assert st.bytes_served == from_origin  # not one byte more from the origin
    found = [line for line in second.stderr.splitlines() if "peers found on the LAN" in line]
    assert len(found) == 1
    assert f"peer+http://127.0.0.1:{port}" in json.loads(found[0])["peers"]
    assert "from peer+mdns://" in second.stderr
    for rel, data in FILES.items():
        assert (tmp_path / "next" / rel).read_bytes() == data


def test_kensho_up_with_share_announce_says_a_key_is_needed_and_never_the_key(
    tmp_path: Path,
) -> None:
    key = "lan-key-123456"
    env = kensho_env(
        tmp_path, KENSHO_MODEL_ENGINE="mock", KENSHO_API_KEY=key, KENSHO_SHARE_ANNOUNCE="true"
    )
    with watching(SERVICE_TYPE) as watcher, kensho_up(env=env, cwd=tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        info = watcher.wait_for_port(SERVICE_TYPE, port)
        assert info.properties[b"auth"] == b"bearer"
        assert key.encode() not in b"".join(v or b"" for v in info.properties.values())
        server.stop(signal.SIGTERM)
        watcher.wait_for(ServiceStateChange.Removed, lambda name: name == info.name, 10.0)


def test_kensho_up_refuses_share_announce_with_sharing_off(tmp_path: Path) -> None:
    env = kensho_env(
        tmp_path,
        KENSHO_MODEL_ENGINE="mock",
        KENSHO_SHARE_ANNOUNCE="true",
        KENSHO_SHARE_ENABLED="false",
    )
    r = run_kensho("up", env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "share.announce" in r.stderr
    assert "share.enabled is off" in r.stderr


def test_kensho_share_announce_without_zeroconf_names_the_extra(tmp_path: Path) -> None:
    with http_server(FILES) as (origin, _):
        assert sync(tmp_path, tmp_path / "seed", origin).returncode == 0
    hide = (
        "import sys; sys.modules['zeroconf'] = None; "  # an install without the extra
        "from kensho.cli import main; sys.argv[0] = 'kensho'; main()"
    )
    r = subprocess.run(
        [sys.executable, "-c", hide, "share", "--root", str(tmp_path / "seed"), "--announce"],
        cwd=tmp_path,
        env=clean_env(XDG_DATA_HOME=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "pip install 'kensho[mdns]'" in r.stderr
