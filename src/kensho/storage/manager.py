"""StorageManager: verify a store, repair it from sources, boot offline.

Every public operation is an async iterator of events (``kensho.events``), so the
same run can drive progress bars, JSON logs or a server-sent event stream::

    manager = StorageManager(root, manifest, [HttpSource(url)])
    async for event in manager.initialize_and_verify():
        render(event)
    manager.report   # the final VerifyReport

The iterator raises at the end when the operation fails: ``IntegrityError`` (required
files cannot be made good, each listed with its reason), ``DiskSpaceError`` (checked
before any byte is written), ``StoreBusyError`` (``wait=False`` and another process
is repairing).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from kensho.config import Settings
from kensho.errors import IntegrityError, ManifestError
from kensho.events import (
    Event,
    StorageLockWaiting,
    StorageReady,
    StorageRepairFailed,
    StorageRepairStarted,
    StorageUpdateFinished,
)
from kensho.hub import EventHub
from kensho.storage._assemble import (
    BuildOutcome,
    FileAssembler,
    build_each,
    bytes_to_write,
    check_free_space,
    part_path,
)
from kensho.storage._chunk_io import PartWriter
from kensho.storage._lock import StoreLock
from kensho.storage._plan import UpdatePlan, plan_update
from kensho.storage._repair import FileRepairer
from kensho.storage._update import DeltaUpdater, check_update_space, plan_events
from kensho.storage._verify import Emit, verify_store
from kensho.storage.hashing import IOPool
from kensho.storage.manifest import Manifest, dump_manifest, load_manifest, parse_manifest
from kensho.storage.release import Release, ReleaseTrust
from kensho.storage.report import FileReport, FileStatus, VerifyReport
from kensho.storage.signing import TrustedKeys
from kensho.storage.sources import ChunkAddressed, Source, source_from_string
from kensho.storage.state import StateStore, StatRecord
from kensho.telemetry import get_logger

__all__ = ["DEFAULT_SPACE_MARGIN", "StorageManager"]

#: Kept free on top of what a repair writes: file systems misbehave when full.
DEFAULT_SPACE_MARGIN = 16 * 1024 * 1024
_log = get_logger("storage")
_DONE = object()


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


async def _emitted_events(
    work: Callable[[Emit], Awaitable[object]], hub: EventHub
) -> AsyncIterator[Event]:
    """Run ``work`` as a task and yield what it emits (published on ``hub`` as it
    happens); re-raise what it raises."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    def emit(event: Event) -> None:
        hub.emit(event)
        queue.put_nowait(event)

    async def runner() -> None:
        try:
            await work(emit)
        finally:
            queue.put_nowait(_DONE)

    task = asyncio.create_task(runner())
    try:
        while (item := await queue.get()) is not _DONE:
            assert isinstance(item, Event)
            yield item
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class StorageManager:
    """The integrity store of one root folder.

    ``manifest`` may be ``None``: the last trusted manifest under ``.kensho/`` is
    used (offline boot). ``sources`` are tried in order and closed by :meth:`aclose`.
    ``trust`` are the configured keys; the keys pinned in the store at its first
    signed sync apply as well (docs/signing.md, "Pinned keys"). ``disk_free`` (bytes
    free for a path) is injectable for tests, and so is ``part_writer``: every
    byte repairs and updates write, and every swap into place, goes through it
    (:class:`PartWriter`; a failing one simulates a full disk or a crash). Every
    event is also published on ``hub`` as it happens (the kernel passes the
    service's one hub; by default the manager makes its own).
    """

    def __init__(
        self,
        root: Path | str,
        manifest: Manifest | None = None,
        sources: Sequence[Source] = (),
        *,
        hasher: IOPool | None = None,
        disk_free: Callable[[Path], int] = _free_bytes,
        space_margin: int = DEFAULT_SPACE_MARGIN,
        mismatch_retries: int = 3,
        repair_concurrency: int = 2,
        trust: TrustedKeys | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        hub: EventHub | None = None,
        part_writer: PartWriter | None = None,
    ) -> None:
        self.root = Path(root)
        self.hub = hub if hub is not None else EventHub()
        self._updating = False  # an update in progress ends with a plain _initialize
        self._finishing = False  # finishing an update journaled before a crash
        self.sources = list(sources)
        self.state = StateStore(self.root)
        self._trust = ReleaseTrust(self.state, trust or TrustedKeys({}), now)
        self._release = Release.of(manifest)  # the manifest in use, and its trust
        self.disk_free = disk_free
        self.space_margin = space_margin
        self.mismatch_retries = mismatch_retries
        self.repair_concurrency = repair_concurrency
        self.report: VerifyReport | None = None
        self.plan: UpdatePlan | None = None
        self.offline = False
        self._failures: dict[str, str] = {}
        self._own_hasher = hasher is None
        self._hasher = hasher or IOPool()
        self._lock = StoreLock(self.state.dir / "lock")
        self._writer = part_writer or PartWriter()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        root: Path | None = None,
        manifest: Path | None = None,
        sources: Sequence[str] | None = None,
        first_sources: Sequence[Source] = (),
        hub: EventHub | None = None,
    ) -> StorageManager:
        """A manager wired from ``settings``: ``[storage]`` root, manifest and sources
        (parsed with its HTTP options), ``[trust]`` keys.

        Why here: the kernel and the CLI build the same manager; each argument given
        replaces one setting (a ``--root`` or ``--manifest`` flag, ``--source`` specs,
        the demo's own folder ahead of the configured sources).
        """
        storage = settings.storage
        path = manifest or storage.manifest
        specs = storage.sources if sources is None else sources
        return cls(
            root or storage.root,
            load_manifest(path) if path else None,
            [*first_sources, *(source_from_string(s, settings=storage) for s in specs)],
            trust=TrustedKeys.from_hex(settings.trust.keys, settings.trust.threshold),
            hub=hub,
        )

    @property
    def given_manifest(self) -> Manifest | None:
        """The manifest this manager was given (to sync or update to), if any."""
        return self._release.manifest if self._release.given else None

    async def __aenter__(self) -> StorageManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close sources, the state database and the hash pool."""
        for source in self.sources:
            await source.aclose()
        self.state.close()
        if self._own_hasher:
            await asyncio.to_thread(self._hasher.close)

    async def manifest(self) -> Manifest:
        """The manifest in use: the given one, else the last trusted one.

        The first call checks trust (see :mod:`kensho.storage.signing`): signatures
        against the pinned and the configured keys, no rollback below the last
        trusted serial, and expiry, which forbids fetching but not verifying
        (offline boot goes on).
        """
        self._release = await self._trust.select(self._release)
        assert self._release.manifest is not None
        return self._release.manifest

    # --- public operations ----------------------------------------------------------

    def verify(self, *, full: bool = False) -> AsyncIterator[Event]:
        """Check every file; ``full`` re-hashes even files whose stat record is fresh."""
        return _emitted_events(lambda emit: self._verify(emit, full=full), self.hub)

    def repair(self, *, wait: bool = True) -> AsyncIterator[Event]:
        """Take the store lock, re-check, and fix every missing or corrupt file."""
        return _emitted_events(lambda emit: self._repair(emit, wait=wait), self.hub)

    def initialize_and_verify(
        self, *, wait: bool = True, full: bool = False
    ) -> AsyncIterator[Event]:
        """The boot sequence: verify, repair if needed and possible, then report ready.

        Raises ``IntegrityError`` at the end if a required file is still not good.
        """
        return _emitted_events(lambda emit: self._initialize(emit, wait=wait, full=full), self.hub)

    def update(
        self, new_manifest: Manifest, *, dry_run: bool = False, wait: bool = True
    ) -> AsyncIterator[Event]:
        """Update the store to ``new_manifest`` (a higher serial), fetching only what changed.

        Streams the plan first (one ``StorageUpdateFilePlanned`` per file, then a
        ``StorageUpdatePlanned`` total; also kept in :attr:`plan`). ``dry_run`` stops
        there and changes nothing. Otherwise every changed file is assembled in
        ``.kensho/tmp`` from local chunks and fetched byte ranges, verified whole and
        swapped in; then the rest of the store is verified (and repaired) against
        the new manifest, which becomes the trusted one. Files the new manifest no
        longer lists are left in place and reported as unexpected. Raises
        ``ManifestError`` (no trusted manifest, serial not higher), ``DiskSpaceError``
        (before writing) or ``IntegrityError`` (the store stays on the old version).

        The trusted serial is read again under the store lock: a store that another
        process brought to this very release meanwhile is verified like a sync; one
        it moved past this release refuses it (``SignatureError``, rollback).
        """
        return _emitted_events(
            lambda emit: self._update(emit, new_manifest, dry_run=dry_run, wait=wait), self.hub
        )

    async def trusted_manifest(self) -> Manifest | None:
        """The manifest last trusted for this store, or ``None`` before the first sync."""
        return await self._trust.trusted_manifest()

    # --- steps ----------------------------------------------------------------------

    async def _take_lock(self, emit: Emit, *, wait: bool) -> None:
        await asyncio.to_thread(self.state.ensure_dir)
        if not await asyncio.to_thread(self._lock.try_acquire):
            if not wait:
                raise self._lock.busy_error(self.root)
            emit(StorageLockWaiting(root=str(self.root), lock_path=str(self._lock.path)))
            await self._lock.acquire()

    async def _adopt_pending(self) -> None:
        """At boot with no manifest given: finish an update killed among its swaps.

        Its files are assembled and verified in ``.kensho/tmp`` and its manifest
        passed the trust checks; finishing needs no network.
        """
        if self._release.given or self._updating:
            return
        pending = await asyncio.to_thread(self.state.load_pending_manifest)
        if pending is None:
            return
        manifest = parse_manifest(pending)
        self._release, self._finishing = Release.of(manifest), True
        _log.warning("finishing an interrupted update", serial=manifest.serial)

    async def _newer_release_given(self) -> bool:
        """Whether boot was given a manifest with a higher serial than the trusted one."""
        if not self._release.given or self._updating:
            return False
        if not self.sources and not self._finishing:
            return False
        try:
            current = await self.trusted_manifest()
        except ManifestError:
            return False
        given = self._release.manifest
        return current is not None and given is not None and given.serial > current.serial

    async def _update(self, emit: Emit, new: Manifest, *, dry_run: bool, wait: bool) -> None:
        self._updating = True
        saved = self._release
        try:
            await self._update_locked(emit, new, dry_run=dry_run, wait=wait)
        except BaseException:
            self._release = saved  # a refused or failed update keeps the release it had
            raise
        else:
            if dry_run:  # a plan only: nothing changed, so neither does the manager
                self._release = saved
        finally:
            self._updating = False

    async def _update_locked(self, emit: Emit, new: Manifest, *, dry_run: bool, wait: bool) -> None:
        started = time.perf_counter()
        # Refuse what is not an update of the release the store holds at the call...
        ReleaseTrust.accept_update(self.root, await self.trusted_manifest(), new)
        if not dry_run:
            await self._take_lock(emit, wait=wait)
        try:
            # ...and decide again under the lock, from the trusted state re-read: another
            # process may have moved the store while this one waited. The new manifest
            # goes through the same trust checks as any given one (signatures, rollback
            # against the trusted serial now, expiry); an expired one updates nothing.
            current = await self.trusted_manifest()
            self._release = Release.of(new)
            await self.manifest()
            if current is not None and current.serial == new.serial:
                await self._already_applied(emit, new, dry_run=dry_run)
                return
            current = ReleaseTrust.accept_update(self.root, current, new)
            self._release.refuse_if_expired()
            records = await asyncio.to_thread(self.state.records)
            plan = await asyncio.to_thread(plan_update, self.root, current, new, records)
            self.plan = plan
            for event in plan_events(plan, dry_run=dry_run):
                emit(event)
            if dry_run:
                return
            await self._apply_update(emit, plan, started)
        finally:
            if not dry_run:
                self._lock.release()

    async def _already_applied(self, emit: Emit, new: Manifest, *, dry_run: bool) -> None:
        """The store reached ``new`` while this update waited: verify it as a sync would.

        Only the very same release gets here (the rollback rule refused another one
        with this serial), so there is nothing to plan; repairs still happen.
        """
        _log.info("the store already holds the release to update to", serial=new.serial)
        if dry_run:
            await self._verify(emit, full=False)
        else:
            await self._initialize(emit, wait=True, full=False)

    async def _apply_update(self, emit: Emit, plan: UpdatePlan, started: float) -> None:
        free = await asyncio.to_thread(self.disk_free, self.state.tmp_dir)
        await check_update_space(
            self.root, plan, self.state.tmp_dir, margin=self.space_margin, free=free
        )
        assembler = self._assembler(emit, plan.target)
        updater = DeltaUpdater(assembler, state=self.state, concurrency=self.repair_concurrency)
        try:
            built = await updater.assemble_all(plan)
        finally:
            assembler.close()
        problems = {b.plan.entry.path: b.outcome.reason for b in built if not b.outcome.ok}
        required = {f.path for f in plan.target.files if f.required}
        blocking = {p: r for p, r in problems.items() if p in required}
        if blocking:
            listing = "; ".join(f"{p} ({why})" for p, why in blocking.items())
            raise IntegrityError(
                f"the update of {self.root} to serial {plan.target.serial} stopped before "
                f"changing anything: {len(blocking)} required file(s) could not be built: "
                f"{listing}. The store still holds serial {plan.current.serial}; fix the "
                "sources and run the sync again (finished work is kept and resumed)",
                problems=blocking,
            )
        await asyncio.to_thread(self.state.save_pending_manifest, dump_manifest(plan.target))
        records = await updater.swap_all(built)
        # Verify the rest against the new manifest, repair it, make it the trusted one.
        await self._initialize(emit, wait=True, full=False)
        emit(
            StorageUpdateFinished(
                serial=plan.target.serial,
                files=len(records),
                fetched=sum(b.outcome.fetched for b in built if b.outcome.ok),
                reused=sum(b.reused for b in built if b.outcome.ok),
                seconds=time.perf_counter() - started,
            )
        )

    async def _verify(self, emit: Emit, *, full: bool) -> VerifyReport:
        manifest = await self.manifest()
        self.report = await verify_store(
            self.root, manifest, self.state, self._hasher, emit, full=full
        )
        return self.report

    async def _repair(self, emit: Emit, *, wait: bool) -> VerifyReport:
        await self.manifest()
        self._release.refuse_if_expired()
        await self._take_lock(emit, wait=wait)
        try:
            await self._recheck_release()
            self._release.refuse_if_expired()
            # Orphaned partial files first: on a nearly full disk they could be what
            # makes the space check below fail, every run.
            await asyncio.to_thread(self._drop_stale_parts, await self.manifest())
            # Re-check under the lock: another process may have repaired meanwhile.
            report = await self._verify(emit, full=False)
            if report.to_repair:
                report = await self._repair_files(emit, report)
            self.report = report
            return report
        finally:
            self._lock.release()

    async def _recheck_release(self) -> None:
        """Under the lock: re-read the trusted state another process may have changed.

        A given manifest must still pass the rollback rule (an update may have moved
        the store past it while this run waited for the lock). A run on the trusted
        manifest switches to the one trusted now, so it repairs against the current
        release and never reverts another process's update.
        """
        self._release = await self._trust.recheck(self._release)

    async def _commit_release(self, emit: Emit, *, wait: bool) -> None:
        """Record the manifest in use as trusted and pin the keys, under the lock.

        The rollback rule is checked again under the lock, so a run that verified
        an older release while another process updated the store never records it.
        The usual boot has nothing to write and takes no lock.
        """
        if self._release.expired is not None:
            return
        manifest = await self.manifest()
        data = dump_manifest(manifest) if self._release.given else None
        if not await self._commit_needed(data):
            return
        await self._take_lock(emit, wait=wait)
        try:
            if data is not None:
                await self._trust.check_not_older(manifest)
                if await asyncio.to_thread(self.state.load_trusted_manifest) != data:
                    await asyncio.to_thread(self.state.save_trusted_manifest, data)
                await asyncio.to_thread(self.state.clear_pending_manifest)
            await self._trust.pin_keys()  # after the manifest: a crash between keeps both valid
        finally:
            self._lock.release()

    async def _commit_needed(self, data: bytes | None) -> bool:
        if data is not None and (
            await asyncio.to_thread(self.state.load_trusted_manifest) != data
            or await asyncio.to_thread(self.state.has_pending_manifest)
        ):
            return True
        return await self._trust.keys_to_pin()

    def _drop_stale_parts(self, manifest: Manifest) -> None:
        """Delete partial files no entry of ``manifest`` can resume (under the lock).

        Why: a file dropped from the manifest, or made good by another path, would
        otherwise leave its partial data in ``.kensho/tmp`` forever.
        """
        keep = {part_path(self.state.tmp_dir, f).name for f in manifest.files}
        try:
            leftovers = [p for p in self.state.tmp_dir.glob("*.part") if p.name not in keep]
        except OSError:
            return
        for path in leftovers:
            with contextlib.suppress(OSError):
                path.unlink()

    async def _initialize(self, emit: Emit, *, wait: bool, full: bool) -> None:
        await self._adopt_pending()
        if await self._newer_release_given():
            # A newer release at boot: update by plan (chunk reuse from anywhere in the
            # store, merged ranges) instead of repairing every changed file as corrupt.
            new = self._release.manifest
            assert new is not None
            try:
                await self._update(emit, new, dry_run=False, wait=wait)
                return
            except IntegrityError as exc:
                # Offline-first: the new release cannot be fetched now, but the trusted
                # one is intact on disk. Boot on it; the update runs at the next boot.
                _log.warning(
                    "update pending: the store stays on its trusted release",
                    pending_serial=new.serial,
                    reason=str(exc),
                )
                self._release = Release.of(None)  # the trusted one, reloaded on next use
        report = await self._verify(emit, full=full)
        # An expired manifest never fetches: the store is then offline by policy, and
        # the required/optional rules below decide between degraded mode and refusal.
        can_fetch = bool(self.sources) and self._release.expired is None
        self.offline = not can_fetch
        if report.to_repair and can_fetch:
            report = await self._repair(emit, wait=wait)
        problems = {f.path: self._why(f) for f in report.files if f.required and f.needs_repair}
        if problems:
            listing = "; ".join(f"{p} ({why})" for p, why in problems.items())
            raise IntegrityError(
                f"{len(problems)} required file(s) in {self.root} could not be made good: "
                f"{listing}. Check the sources (--source) and run `kensho sync` again",
                problems=problems,
            )
        degraded = tuple(f.path for f in report.files if not f.required and f.needs_repair)
        await self._commit_release(emit, wait=wait)
        emit(StorageReady(state=report.status.value, offline=self.offline, degraded=degraded))

    def _why(self, report: FileReport) -> str:
        reason = self._failures.get(report.path)
        if reason:
            return f"{report.status.value}: {reason}"
        if self._release.expired is not None and report.status != FileStatus.UNSAFE:
            manifest = self._release.manifest
            expires = manifest.expires if manifest is not None else "?"
            return (
                f"{report.status.value}; the manifest expired at {expires}, so nothing is "
                "fetched (publish a fresh manifest)"
            )
        if not self.sources and report.status != FileStatus.UNSAFE:
            return f"{report.status.value}; no source to repair it from"
        return report.status.value + (f": {report.detail}" if report.detail else "")

    async def _precheck_space(self, manifest: Manifest, bad: Sequence[FileReport]) -> int:
        """Bytes still to write; raise ``DiskSpaceError`` before writing any of them."""

        entries = [
            entry
            for f in bad
            if f.status != FileStatus.UNSAFE and (entry := manifest.file(f.path)) is not None
        ]
        needed = await asyncio.to_thread(bytes_to_write, self.state.tmp_dir, entries)
        free = await asyncio.to_thread(self.disk_free, self.state.tmp_dir)
        check_free_space(
            what=f"repairing {len(bad)} file(s) in {self.root}",
            where="",
            needed=needed,
            margin=self.space_margin,
            free=free,
        )
        return needed

    def tell_chunk_sources(self, manifest: Manifest) -> None:
        """Give the sources that fetch by chunk hash (peers) ``manifest``'s chunk lists.

        Why: a peer is asked for byte ranges like any source and must map them onto
        the chunks of the release *being built*; told another release, it asks its
        neighbour for the wrong hashes and the origin serves everything. Every run
        that builds files (a repair, an update, a staging) calls this first.
        """
        for source in self.sources:
            if isinstance(source, ChunkAddressed):
                source.know(manifest)

    def _assembler(self, emit: Emit, manifest: Manifest) -> FileAssembler:
        """The build layer for one repair or update run (shares its distrust list).

        Sources that fetch by chunk hash (peers) learn ``manifest``'s chunk lists.
        """
        self.tell_chunk_sources(manifest)
        return FileAssembler(
            root=self.root,
            tmp_dir=self.state.tmp_dir,
            sources=self.sources,
            io=self._hasher,
            emit=emit,
            mismatch_retries=self.mismatch_retries,
            free_space=self.disk_free,
            writer=self._writer,
        )

    async def _repair_files(self, emit: Emit, report: VerifyReport) -> VerifyReport:
        manifest = await self.manifest()
        bad = report.to_repair
        needed = await self._precheck_space(manifest, bad)
        free = await asyncio.to_thread(self.disk_free, self.state.tmp_dir)
        emit(StorageRepairStarted(files=len(bad), bytes_needed=needed, bytes_free=free))
        assembler = self._assembler(emit, manifest)
        repairer = FileRepairer(assembler)

        async def one(file_report: FileReport) -> BuildOutcome:
            entry = manifest.file(file_report.path)
            assert entry is not None
            return await repairer.repair(entry, file_report)

        # One failure (ENOSPC) cancels the other files and is raised alone.
        try:
            results = await build_each(
                bad, one, lambda f: f.expected_size or 0, self.repair_concurrency
            )
        finally:
            assembler.close()
        outcomes = {f.path: o for f, o in zip(bad, results, strict=True)}
        good: list[tuple[str, str, StatRecord]] = []
        self._failures = {}
        for path, outcome in outcomes.items():
            entry = manifest.file(path)
            assert entry is not None
            if outcome.ok and outcome.record is not None:
                good.append((path, entry.sha256, outcome.record))
            else:
                self._failures[path] = outcome.reason
                emit(StorageRepairFailed(path=path, required=entry.required, reason=outcome.reason))
        await asyncio.to_thread(self.state.put, good)
        failed = [o for o in outcomes.values() if not o.ok]
        self.offline = bool(failed) and all(o.unreachable for o in failed)
        repaired = {p for p, _, _ in good}
        files = tuple(
            FileReport(f.path, FileStatus.OK, f.required, f.expected_size, f.expected_size)
            if f.path in repaired
            else f
            for f in report.files
        )
        return VerifyReport(files, report.bytes_hashed, report.seconds)
