"""``kensho keygen`` and ``kensho manifest sign`` end to end."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from _server_support import kensho_env, run_kensho
from kensho.storage import load_manifest
from kensho.storage.signing import TrustedKeys, verify_signatures


def kensho(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_kensho(*args, env=kensho_env(cwd), cwd=cwd, timeout=60)


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
