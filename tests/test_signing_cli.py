"""``kensho keygen`` and ``kensho manifest sign`` end to end."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from _server_support import kensho_env, run_kensho
from kensho.storage import load_manifest
from kensho.storage.signing import TrustedKeys, verify_signatures


def kensho(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Wide enough that error messages are not wrapped across lines.
    return run_kensho(*args, env=kensho_env(cwd, COLUMNS="400"), cwd=cwd, timeout=60)


def test_keygen_then_sign_produces_a_manifest_trusted_by_that_key(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.bin").write_bytes(b"payload" * 100)
    made = kensho("keygen", "-o", "signing.key", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE((tmp_path / "signing.key").stat().st_mode) == 0o600
    public = made.stdout.split("public key:")[1].split()[0]
    built = kensho("manifest", "build", "files", "-o", "m.json", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    signed = kensho("manifest", "sign", "m.json", "--key", "signing.key", cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    manifest = load_manifest(tmp_path / "m.json")
    assert len(manifest.signatures) == 1
    verify_signatures(manifest, TrustedKeys.from_hex([public]))


def test_keygen_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    assert kensho("keygen", "-o", "k", cwd=tmp_path).returncode == 0
    again = kensho("keygen", "-o", "k", cwd=tmp_path)
    assert again.returncode == 6
    assert "refusing to overwrite" in again.stderr


def test_a_signature_listed_twice_is_refused_saying_so(tmp_path: Path) -> None:
    """Two of two keys required; key A's signature listed twice still counts once."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.bin").write_bytes(b"payload" * 100)
    publics = []
    for name in ("a.key", "b.key"):
        made = kensho("keygen", "-o", name, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        publics.append(made.stdout.split("public key:")[1].split()[0])
    listed = ", ".join(f'"{p}"' for p in publics)
    (tmp_path / "kensho.toml").write_text(f"[trust]\nkeys = [{listed}]\nthreshold = 2\n")
    assert kensho("manifest", "build", "files", "-o", "m.json", cwd=tmp_path).returncode == 0
    assert kensho("manifest", "sign", "m.json", "--key", "a.key", cwd=tmp_path).returncode == 0
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["signatures"] *= 2
    (tmp_path / "m.json").write_text(json.dumps(doc))
    done = kensho("sync", "-m", "m.json", "-r", "store", "-s", "files", cwd=tmp_path)
    assert done.returncode == 6, done.stdout + done.stderr
    assert "is listed more than once (it counts once)" in done.stderr
    assert "carries no signatures" not in done.stderr
    assert not (tmp_path / "store" / "a.bin").exists()
