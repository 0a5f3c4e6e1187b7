"""``kensho keygen`` and ``kensho manifest sign``: Ed25519 keys and manifest signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kensho.cli._app import app, err_console, out_console, plain
from kensho.cli._storage_cmds import manifest_app

__all__ = ["keygen", "sign"]


@app.command(
    help="Create an Ed25519 signing key (PEM, mode 0600) and print its public key and id.\n\n"
    "Put the public key in the [trust] keys list of every Kensho that must accept "
    "manifests signed with it; keep the private key offline."
)
def keygen(
    output: Annotated[Path, typer.Option("--output", "-o", help="Private key file to create.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing key file.")] = False,
) -> None:
    from kensho.storage.signing import (
        generate_private_key,
        key_id,
        public_key_hex,
        save_private_key,
    )

    key = generate_private_key()
    save_private_key(output, key, overwrite=force)
    public = key.public_key()
    out_console.print(f"public key: {public_key_hex(public)}", highlight=False)
    out_console.print(f"key id:     {key_id(public)}", highlight=False)
    err_console.print(plain(f"private key written to {output} (mode 0600)"))


@manifest_app.command(
    "sign",
    help="Add a signature over the canonical bytes of the manifest's signed part. "
    "Signing again with the same key replaces its signature; other signatures stay.",
)
def sign(
    manifest: Annotated[Path, typer.Argument(help="Manifest to sign (rewritten in place).")],
    key: Annotated[Path, typer.Option("--key", "-k", help="Private key from kensho keygen.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of in place.")
    ] = None,
) -> None:
    from kensho.storage import dump_manifest, load_manifest
    from kensho.storage._fs import atomic_write_bytes
    from kensho.storage.signing import key_id, load_private_key, sign_manifest

    private = load_private_key(key)
    signed = sign_manifest(load_manifest(manifest), private)
    target = output or manifest
    atomic_write_bytes(target, dump_manifest(signed))
    out_console.print(
        plain(
            f"signed {manifest.name} (serial {signed.serial}) with key "
            f"{key_id(private.public_key())[:16]}…; {len(signed.signatures)} signature(s)"
        )
    )
