"""``kensho verify``, ``kensho sync`` and ``kensho manifest build``.

The commands only wire options to :class:`~kensho.storage.StorageManager` and render
its events: progress bars and a table in a terminal, one JSON object per line with
``--json`` (stdout, flushed per event, so another program can follow a sync live).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer

from kensho.cli._app import (
    ExitCode,
    app,
    err_console,
    labelled,
    out_console,
    plain,
    run_async,
    state,
)
from kensho.errors import StoreBusyError
from kensho.storage._cdc import DEFAULT_CDC_AVG, DEFAULT_CHUNKING

if TYPE_CHECKING:
    # The store, its events and rich's bars load when a command runs, not to declare it.
    from rich.progress import TaskID
    from rich.table import Table

    from kensho.events import Event, StorageUpdateFilePlanned, StorageUpdatePlanned
    from kensho.storage import Chunking, VerifyReport

__all__ = ["manifest_app"]

_VERIFY_EXIT = (
    "Exit codes: 0 every required file is good · 1 a required file is not · 3 bad config."
)
_SYNC_EXIT = (
    "When the store already trusts a manifest with a lower serial, the sync is a delta "
    "update: the plan (per file: version, bytes reused, bytes to fetch) is shown first, "
    "only changed chunks are fetched, and --dry-run shows the plan and changes nothing. "
    "Exit codes: 0 every required file is good afterwards (or the dry run was planned) · "
    "4 a required file could not be repaired or updated · 5 not enough disk space · "
    "7 another process is syncing (--no-wait) · 10 other error (bad manifest, bad source)."
)


class _Chunking(enum.StrEnum):
    FIXED = "fixed"
    CDC = "cdc"


manifest_app = typer.Typer(help="Create and inspect manifests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")

ManifestOpt = Annotated[
    Path | None,
    typer.Option(
        "--manifest",
        "-m",
        help="Manifest file. Default: storage.manifest, else the last trusted one.",
    ),
]
RootOpt = Annotated[
    Path | None, typer.Option("--root", "-r", help="Store folder. Default: storage.root.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print events as JSON lines.")]


class _StorageProgress:
    """Turns events into progress bars and lines (terminal) or JSON lines."""

    def __init__(self, as_json: bool) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.as_json = as_json
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),  # descriptions hold paths
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=as_json or not err_console.is_terminal,
            transient=True,
        )
        self.tasks: dict[str, TaskID] = {}
        self.fetched: dict[str, int] = {}
        self.planned: list[StorageUpdateFilePlanned] = []
        self.plan_total: StorageUpdatePlanned | None = None

    def __enter__(self) -> _StorageProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def _task(self, key: str, description: str, total: int) -> TaskID:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total)
        return self.tasks[key]

    def _plan(self, event: StorageUpdateFilePlanned | StorageUpdatePlanned) -> None:
        """Collect the plan; in a terminal, show it as one table before the work starts."""
        from kensho.events import StorageUpdateFilePlanned

        if isinstance(event, StorageUpdateFilePlanned):
            self.planned.append(event)
            return
        self.plan_total = event
        if not event.dry_run and not self.as_json:  # a dry run prints it on stdout at the end
            self.progress.console.print(_plan_table(self.planned, event))
            self._task("fetch", "fetch (total)", event.bytes_to_fetch)

    def handle(self, event: Event) -> None:
        from kensho.events import (
            StorageDownloadProgress,
            StorageFileChecked,
            StorageHashProgress,
            StorageRepairStarted,
            StorageUpdateFilePlanned,
            StorageUpdatePlanned,
            StorageVerifyStarted,
        )

        if isinstance(event, StorageUpdateFilePlanned | StorageUpdatePlanned):
            self._plan(event)
        if self.as_json:
            sys.stdout.buffer.write(orjson.dumps(event.to_dict()) + b"\n")
            sys.stdout.buffer.flush()
            return
        if isinstance(event, StorageVerifyStarted):
            # A sync verifies twice (before and under the lock): start the bar over.
            task = self._task("verify", "verify (total)", event.total_bytes)
            self.progress.reset(task, total=event.total_bytes)
        elif isinstance(event, StorageHashProgress):
            task = self._task("hash:" + event.path, f"  hash {event.path}", event.total)
            self.progress.update(task, completed=event.done)
        elif isinstance(event, StorageFileChecked):
            if "verify" in self.tasks:
                self.progress.advance(self.tasks["verify"], event.expected_size or 0)
            if "hash:" + event.path in self.tasks:
                self.progress.remove_task(self.tasks.pop("hash:" + event.path))
        elif isinstance(event, StorageRepairStarted):
            self._task("fetch", "fetch (total)", event.bytes_needed)
        elif isinstance(event, StorageUpdateFilePlanned | StorageUpdatePlanned):
            pass  # shown by _plan
        elif isinstance(event, StorageDownloadProgress):
            task = self._task("get:" + event.path, f"  fetch {event.path}", event.total)
            self.progress.update(task, completed=event.done)
            delta = event.done - self.fetched.get(event.path, 0)
            self.fetched[event.path] = event.done
            self.progress.advance(self._task("fetch", "fetch (total)", event.total), delta)
        else:
            self.progress.console.print(event.message, highlight=False, markup=False)


def _table(report: VerifyReport) -> Table:
    from rich.table import Table

    table = Table("path", "status", "required", "size", "detail", title="store")
    colours = {"ok": "green", "unexpected": "yellow"}
    for f in report.files:
        colour = colours.get(f.status.value, "red")
        detail = f.detail
        if f.bad_chunks and f.status.value == "corrupt":
            detail = f"bad chunks: {', '.join(map(str, f.bad_chunks[:10]))}" + (
                "…" if len(f.bad_chunks) > 10 else ""
            )
        table.add_row(
            plain(f.path),
            plain(f.status.value, style=colour),
            "yes" if f.required else "no",
            "" if f.size is None else str(f.size),
            plain(detail),
        )
    return table


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _plan_table(files: list[StorageUpdateFilePlanned], total: StorageUpdatePlanned) -> Table:
    from rich.table import Table

    title = f"update plan: serial {total.from_serial} -> {total.to_serial} ({total.version})"
    if total.dry_run:
        title += " — dry run, nothing changed"
    table = Table(
        "path", "action", "version", "reuse", "fetch", "requests", "changelog", title=plain(title)
    )
    for f in files:
        version = f"{f.previous_version or '-'} -> {f.version or '-'}"
        table.add_row(
            plain(f.path),
            plain(f.action),
            plain(version),
            _size(f.bytes_reused),
            _size(f.bytes_to_fetch),
            str(f.requests),
            plain(f.changelog),
        )
    table.add_section()
    table.add_row(
        f"total ({total.files} to update, {total.unchanged} unchanged)",
        "",
        "",
        _size(total.bytes_reused),
        _size(total.bytes_to_fetch),
        str(sum(f.requests for f in files)),
        "",
    )
    return table


async def _run(events: AsyncIterator[Event], renderer: _StorageProgress, operation: str) -> None:
    """Render ``events`` as they come, inside one trace span named for ``operation``
    (exported with the logs when OTLP export is configured)."""
    from kensho.telemetry import span

    with span(f"kensho.{operation}"), renderer:
        async for event in events:
            renderer.handle(event)


@app.command(help="Check every file of the store against the manifest.\n\n" + _VERIFY_EXIT)
def verify(
    manifest: ManifestOpt = None,
    root: RootOpt = None,
    full: Annotated[
        bool, typer.Option("--full", help="Re-hash every file, ignoring stat records.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    from kensho.storage import StorageManager

    async def go() -> VerifyReport:
        settings = state().settings
        async with StorageManager.from_settings(
            settings, root=root, manifest=manifest, sources=[]
        ) as manager:
            await _run(manager.verify(full=full), _StorageProgress(as_json), "verify")
            assert manager.report is not None
            return manager.report

    report = run_async(go())
    if not as_json:
        out_console.print(_table(report))
    if not report.ok:
        raise typer.Exit(int(ExitCode.FAILED))


@app.command(help="Verify the store and repair it from the sources, in order.\n\n" + _SYNC_EXIT)
def sync(  # noqa: PLR0917 - Typer maps each parameter to an option
    manifest: ManifestOpt = None,
    root: RootOpt = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            "-s",
            help="A folder, file://, http(s)://, s3:// (gs://, az://) or peer+http:// URL, "
            "or peer+mdns:// (peers on the LAN); repeat for fallbacks. Default: storage.sources.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Fail (exit 7) if another sync holds the store.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Show what an update would reuse and fetch; change nothing."
        ),
    ] = False,
) -> None:
    from kensho.storage import StorageManager
    from kensho.storage.prefetch import apply_staged_at_start

    renderer = _StorageProgress(as_json)

    async def go() -> VerifyReport | None:
        settings = state().settings
        async with StorageManager.from_settings(
            settings, root=root, manifest=manifest, sources=source or None
        ) as manager:
            if not dry_run:  # a release staged in the background is applied first
                await apply_staged_at_start(manager, how="sync", emit=renderer.handle)
            loaded = manager.given_manifest
            trusted = await manager.trusted_manifest() if loaded is not None else None
            if loaded is not None and trusted is not None and loaded.serial > trusted.serial:
                await _run(
                    manager.update(loaded, dry_run=dry_run, wait=not no_wait), renderer, "update"
                )
            elif dry_run:
                # Nothing to update: report what a sync would find, write nothing.
                await _run(manager.verify(), renderer, "verify")
            else:
                await _run(manager.initialize_and_verify(wait=not no_wait), renderer, "sync")
            return manager.report

    try:
        report = run_async(go())
    except StoreBusyError as exc:
        err_console.print(labelled("busy:", "bold red", exc))
        raise typer.Exit(int(ExitCode.BUSY)) from None
    if as_json:
        return
    if dry_run and renderer.plan_total is not None:
        out_console.print(_plan_table(renderer.planned, renderer.plan_total))
    elif report is not None:
        out_console.print(_table(report))
        if dry_run:
            err_console.print("dry run: no newer manifest to update to; nothing changed")


@manifest_app.command("build")
def build(  # noqa: PLR0917 - Typer maps each parameter to an option
    folder: Annotated[Path, typer.Argument(help="Folder whose files the manifest lists.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Manifest file to write.")],
    chunk_size: Annotated[
        int | None,
        typer.Option(
            help="Chunk size in bytes: exact with --chunking fixed (default 4 MiB), the "
            "average with cdc. Given alone, it means --chunking fixed."
        ),
    ] = None,
    chunking: Annotated[
        _Chunking | None,
        typer.Option(
            help=f"fixed-size or content-defined (FastCDC) chunks. Default: {DEFAULT_CHUNKING} "
            "(see docs/manifest.md, 'Chunking')."
        ),
    ] = None,
    cdc_avg: Annotated[
        int | None,
        typer.Option(help=f"CDC average chunk size (default {DEFAULT_CDC_AVG} bytes)."),
    ] = None,
    cdc_min: Annotated[
        int | None, typer.Option(help="CDC minimum chunk size. Default: a quarter of the average.")
    ] = None,
    cdc_max: Annotated[
        int | None, typer.Option(help="CDC maximum chunk size. Default: four times the average.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name. Default: the folder's name.")] = None,
    version: Annotated[str, typer.Option(help="Release version, also given to files.")] = "1",
    serial: Annotated[int, typer.Option(help="Release number; must grow every release.")] = 1,
    optional: Annotated[
        list[str] | None,
        typer.Option(help="Glob of files that are optional (required: false); repeatable."),
    ] = None,
    expires_days: Annotated[
        int | None, typer.Option(help="Set `expires` this many days from now.")
    ] = None,
) -> None:
    """Hash every file of FOLDER (in parallel) into a manifest, written atomically.

    Exit codes: 0 written · 10 a file name breaks a manifest rule (named).
    """
    from kensho.storage import CdcParams, build_manifest, dump_manifest
    from kensho.storage._fs import atomic_write_bytes

    now = datetime.now(UTC)
    expires = now + timedelta(days=expires_days) if expires_days else None
    scheme: Chunking | None = None
    if chunking is not None:
        scheme = "cdc" if chunking is _Chunking.CDC else "fixed"
    elif any(v is not None for v in (cdc_avg, cdc_min, cdc_max)):
        scheme = "cdc"
    cdc = None
    if scheme == "cdc" or (scheme is None and chunk_size is None and DEFAULT_CHUNKING == "cdc"):
        avg = cdc_avg or chunk_size or DEFAULT_CDC_AVG
        cdc = CdcParams.from_sizes(avg, cdc_min, cdc_max)
        scheme = "cdc"
    result = run_async(
        build_manifest(
            folder,
            name=name or folder.resolve().name or "store",
            version=version,
            serial=serial,
            chunk_size=chunk_size if scheme != "cdc" else None,
            chunking=scheme,
            cdc=cdc,
            optional=optional or (),
            created=now,
            expires=expires,
        )
    )
    atomic_write_bytes(output, dump_manifest(result))
    summary = f"wrote {output}: {len(result.files)} files, {result.total_size} bytes"
    err_console.print(plain(summary))
