"""Background prefetch of a release into ``.kensho/staging/``, and applying it.

:class:`Prefetcher` stages a newer trusted release (found by
:mod:`kensho.storage.channel`) while the store keeps serving: it plans the delta
exactly as an update does (:func:`~kensho.storage._plan.plan_update`: chunks reused
from any local file, changed byte ranges merged), and builds every changed file with
the update's own build path (:class:`~kensho.storage._update.DeltaUpdater` over a
:class:`~kensho.storage._assemble.FileAssembler` whose partial files live in the
staging folder instead of ``.kensho/tmp``). So:

- the files being served are only read (as chunk donors), never written;
- every byte staged is hashed on its way in, and each file whole at the end;
- a run killed at any moment (SIGKILL included) resumes where it stopped: the
  partial files are named by path, and their chunks that still hash right are kept;
- a full disk stops staging with a :class:`~kensho.events.ReleasePrefetchStopped`
  (``disk_full``), checked up front against the space the release needs plus the
  store's margin, so staging never eats the room the running release needs;
- ``rate`` (``storage.prefetch_rate``, bytes/s) bounds what staging takes from the
  link, and it builds one file at a time: it is background work.

Staging is one release at a time: a newer one replaces the staged manifest and
resumes from the partial files (chunks of the same bytes at the same offsets stay).
A release is *staged* once every required file is built and verified; the
``complete`` marker holds its digest.

:func:`apply_staged` switches the store to the staged release with no network: the
staged files move into ``.kensho/tmp`` (one rename each), where the ordinary update
(:meth:`StorageManager.update`) finds them complete (each chunk re-hashed, nothing
fetched), journals, swaps them in and records the release as trusted. Every trust
rule runs again there, so a staged manifest altered on disk is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from kensho.errors import DiskSpaceError, KenshoError, ManifestError, UnsafePathError
from kensho.events import (
    Event,
    ReleaseApplied,
    ReleaseApplyFailed,
    ReleasePrefetchProgress,
    ReleasePrefetchStopped,
    ReleaseStaged,
    StorageDownloadProgress,
)
from kensho.storage._assemble import FileAssembler, part_path
from kensho.storage._fs import atomic_write_bytes
from kensho.storage._lock import StoreLock
from kensho.storage._plan import UpdatePlan, plan_update
from kensho.storage._update import DeltaUpdater, check_update_space
from kensho.storage.manager import StorageManager
from kensho.storage.manifest import Manifest, dump_manifest, parse_manifest
from kensho.storage.release import Release
from kensho.storage.signing import manifest_digest
from kensho.storage.sources import Sink, Source
from kensho.storage.state import StateStore
from kensho.telemetry import get_logger

__all__ = [
    "Prefetcher",
    "RateLimiter",
    "StageResult",
    "Staging",
    "apply_staged",
    "apply_staged_at_start",
    "forget_previous",
    "previous_kept",
    "restore_previous",
]

_log = get_logger("storage.release")

#: Where a release is staged, under the store's ``.kensho`` folder.
STAGING_DIR = "staging"
#: Where a live apply keeps the files it replaced, until the new release has served.
PREVIOUS_DIR = "previous"


class Staging:
    """The staging folder of one store: the release being staged and its files."""

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.dir = state.dir / STAGING_DIR
        self.manifest_path = self.dir / "release.json"
        self.complete_path = self.dir / "complete"
        self.failed_path = self.dir / "failed"
        self.lock = StoreLock(self.dir / "lock")

    def ensure(self) -> None:
        """Create the folder (inside the store: a planted symlink is refused)."""
        self.state.ensure_dir()
        self.dir.mkdir(exist_ok=True)
        if self.dir.is_symlink() or not self.dir.is_dir():
            raise UnsafePathError(f"{self.dir} is not a folder inside the store; remove it")

    def manifest(self) -> Manifest | None:
        """The release being staged, or ``None`` (none, or its record is unreadable)."""
        try:
            return parse_manifest(self.manifest_path.read_bytes())
        except (OSError, KenshoError):
            return None

    def begin(self, manifest: Manifest) -> None:
        """Record ``manifest`` as the release being staged (first, so a resume after
        a kill knows what it was staging even offline)."""
        self.ensure()
        data = dump_manifest(manifest)
        with contextlib.suppress(OSError):
            if self.manifest_path.read_bytes() == data:
                return
        self.complete_path.unlink(missing_ok=True)
        atomic_write_bytes(self.manifest_path, data, tmp_dir=self.dir)

    def mark_complete(self, manifest: Manifest) -> None:
        atomic_write_bytes(self.complete_path, manifest_digest(manifest).encode(), tmp_dir=self.dir)

    def complete(self) -> Manifest | None:
        """The staged release if every required file of it is staged, else ``None``."""
        manifest = self.manifest()
        if manifest is None:
            return None
        try:
            marker = self.complete_path.read_bytes().decode()
        except (OSError, UnicodeDecodeError):
            return None
        return manifest if marker == manifest_digest(manifest) else None

    def clear(self) -> None:
        """Drop everything staged (after an apply), but the lock and the failed list."""
        with contextlib.suppress(FileNotFoundError):
            for item in self.dir.iterdir():
                if item.name not in {"lock", "failed"}:
                    item.unlink(missing_ok=True)

    def failed(self) -> set[str]:
        """Digests of releases that failed to load here: never staged again."""
        try:
            return set(self.failed_path.read_text().split())
        except (OSError, UnicodeDecodeError):
            return set()

    def mark_failed(self, manifest: Manifest) -> None:
        self.ensure()
        digests = sorted(self.failed() | {manifest_digest(manifest)})
        atomic_write_bytes(self.failed_path, "\n".join(digests).encode(), tmp_dir=self.dir)


class RateLimiter:
    """A token bucket of ``rate`` bytes/s (0: unlimited), one second deep.

    ``monotonic`` and ``sleep`` are injectable, so a test runs it on virtual time.
    """

    def __init__(
        self,
        rate: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.monotonic = monotonic
        self.sleep = sleep
        self._tokens = float(rate)
        self._at = monotonic()

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under the rate."""
        if self.rate <= 0:
            return
        now = self.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            await self.sleep(-self._tokens / self.rate)


@dataclass
class _Throttled:
    """A source whose deliveries pass through a :class:`RateLimiter` (staging only)."""

    source: Source
    limiter: RateLimiter

    @property
    def name(self) -> str:
        return self.source.name

    async def fetch(self, path: str, offset: int, length: int, file_size: int, sink: Sink) -> None:
        async def slowed(piece: bytes) -> None:
            await self.limiter.take(len(piece))
            await sink(piece)

        await self.source.fetch(path, offset, length, file_size, slowed)

    async def aclose(self) -> None:
        return None  # the manager closes the real source


@dataclass
class StageResult:
    """How a staging run ended: ``staged`` (complete), ``stopped`` or ``busy``."""

    outcome: str
    serial: int
    fetched: int = 0
    reused: int = 0
    detail: str = ""


@dataclass
class _Progress:
    """Bytes fetched per file, turned into one release-wide progress event."""

    serial: int
    total: int
    emit: Callable[[Event], None]
    done: dict[str, int] = field(default_factory=dict)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StorageDownloadProgress):
            self.done[event.path] = event.done
            self.emit(
                ReleasePrefetchProgress(
                    serial=self.serial, done=sum(self.done.values()), total=self.total
                )
            )


class Prefetcher:
    """Stages releases for one store (see the module docstring).

    ``emit`` receives the release events only: the per-chunk storage events of the
    build stay inside (they would read as a repair of the running store).
    """

    def __init__(
        self,
        manager: StorageManager,
        *,
        emit: Callable[[Event], None],
        rate: int = 0,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.manager = manager
        self.staging = Staging(manager.state)
        self.emit = emit
        self.limiter = limiter or RateLimiter(rate)

    async def stage(self, manifest: Manifest) -> StageResult:
        """Stage ``manifest`` (a release the channel trusted) to the end, or stop.

        Another process staging the same store makes this return ``busy`` at once.
        """
        serial = manifest.serial
        await asyncio.to_thread(self.staging.ensure)
        if not await asyncio.to_thread(self.staging.lock.try_acquire):
            return StageResult("busy", serial, detail="another process is staging")
        try:
            return await self._stage_locked(manifest)
        except DiskSpaceError as exc:
            return self._stopped(serial, "disk_full", str(exc))
        except KenshoError as exc:
            return self._stopped(serial, "refused", str(exc))
        finally:
            self.staging.lock.release()

    def _stopped(self, serial: int, reason: str, detail: str) -> StageResult:
        self.emit(ReleasePrefetchStopped(serial=serial, reason=reason, detail=detail))
        return StageResult("stopped", serial, detail=detail)

    async def _stage_locked(self, manifest: Manifest) -> StageResult:
        if manifest_digest(manifest) in await asyncio.to_thread(self.staging.failed):
            raise ManifestError(
                f"release {manifest.serial} failed to load on this device and was rolled "
                "back; it is not staged again (publish a fixed release with a higher serial)"
            )
        complete = await asyncio.to_thread(self.staging.complete)
        if complete is not None and manifest_digest(complete) == manifest_digest(manifest):
            return StageResult("staged", manifest.serial, detail="already staged")
        plan = await self._plan(manifest)
        await asyncio.to_thread(self.staging.begin, manifest)
        progress = _Progress(manifest.serial, plan.bytes_to_fetch, self.emit)
        assembler = self._assembler(progress, manifest)
        updater = DeltaUpdater(assembler, state=self.manager.state, concurrency=1)
        try:
            built = await updater.assemble_all(plan)
        finally:
            assembler.close()
        required = {f.path for f in manifest.files if f.required}
        failed = {b.plan.entry.path: b.outcome.reason for b in built if not b.outcome.ok}
        fetched = sum(b.outcome.fetched for b in built if b.outcome.ok)
        reused = sum(b.reused for b in built if b.outcome.ok)
        if failed.keys() & required:
            detail = "; ".join(f"{p} ({why})" for p, why in failed.items() if p in required)
            return self._stopped(manifest.serial, "source", detail)
        await asyncio.to_thread(self.staging.mark_complete, manifest)
        self.emit(
            ReleaseStaged(
                serial=manifest.serial,
                version=manifest.version,
                files=len(plan.files),
                fetched=fetched,
                reused=reused,
            )
        )
        return StageResult("staged", manifest.serial, fetched, reused)

    async def _plan(self, manifest: Manifest) -> UpdatePlan:
        """The update plan from the trusted release, and room for it (or raise)."""
        manager = self.manager
        current = await manager.trusted_manifest()
        if current is None or manifest.serial <= current.serial:
            raise ManifestError(
                f"release {manifest.serial} is not newer than the trusted release of "
                f"{manager.root}; nothing to stage"
            )
        records = await asyncio.to_thread(manager.state.records)
        plan = await asyncio.to_thread(plan_update, manager.root, current, manifest, records)
        free = await asyncio.to_thread(manager.disk_free, self.staging.dir)
        await check_update_space(
            manager.root, plan, self.staging.dir, margin=manager.space_margin, free=free
        )
        return plan

    def _assembler(self, emit: Callable[[Event], None], manifest: Manifest) -> FileAssembler:
        """The update's build layer over the staging folder, for ``manifest``: peers
        learn its chunk lists (not the running release's), so they serve the new chunks
        they hold before the origin is asked."""
        manager = self.manager
        manager.tell_chunk_sources(manifest)
        return FileAssembler(
            root=manager.root,
            tmp_dir=self.staging.dir,
            sources=[_Throttled(s, self.limiter) for s in manager.sources],
            io=manager._hasher,  # the store's one hash pool
            emit=emit,
            mismatch_retries=manager.mismatch_retries,
            free_space=manager.disk_free,
        )


async def apply_staged(
    manager: StorageManager, *, how: str, emit: Callable[[Event], None], keep: bool = False
) -> Manifest | None:
    """Switch the store to its staged release, offline; the release, or ``None``.

    ``None`` when nothing newer is staged. ``keep``: hard-link the files it replaces
    (and keep the old manifest) under ``.kensho/previous`` first, so
    :func:`restore_previous` can put them back if the new release fails to load.
    A failure (a trust rule, a file that no longer verifies) leaves the store on
    its release, says so with a :class:`ReleaseApplyFailed`, and raises. ``how``
    names the occasion for the :class:`ReleaseApplied` event (``boot``, ``request``,
    ``live``).
    """
    staging = Staging(manager.state)
    staged = await asyncio.to_thread(staging.complete)
    current = await manager.trusted_manifest()
    if staged is None or (current is not None and staged.serial <= current.serial):
        return None
    previous = current.serial if current is not None else None
    lock = manager._lock  # reentrant: the update takes it again inside
    await lock.acquire()
    try:
        # Under the store lock: a repair of another process drops partial files it
        # does not know, and would drop these between the move and the update.
        await asyncio.to_thread(_move_parts, staging, staged, manager.state.tmp_dir)
        if keep and current is not None:
            await asyncio.to_thread(_keep_previous, manager, current, staged)
        async for _ in manager.update(staged):
            pass
    except KenshoError as exc:
        if keep:  # the store stayed on its release: nothing is on trial
            await asyncio.to_thread(forget_previous, manager.state)
        emit(ReleaseApplyFailed(target_serial=staged.serial, serial=previous, reason=str(exc)))
        raise
    finally:
        lock.release()
    await asyncio.to_thread(staging.clear)
    emit(ReleaseApplied(serial=staged.serial, previous_serial=previous, how=how))
    return staged


async def apply_staged_at_start(
    manager: StorageManager, *, how: str, emit: Callable[[Event], None], keep: bool = False
) -> Manifest | None:
    """At boot or ``kensho sync``: apply a staged release, unless the run was given a
    newer manifest than it (that update wins). A failure is reported (and logged),
    not raised: the run goes on with the trusted release. ``keep`` as for
    :func:`apply_staged`: a boot keeps the previous files until its engines loaded
    the new release (:func:`previous_kept`).
    """
    staged = await asyncio.to_thread(Staging(manager.state).complete)
    given = manager.given_manifest
    if staged is None or (given is not None and given.serial > staged.serial):
        return None
    try:
        return await apply_staged(manager, how=how, emit=emit, keep=keep)
    except KenshoError as exc:
        _log.warning("staged release not applied", serial=staged.serial, reason=str(exc))
        return None


def _move_parts(staging: Staging, manifest: Manifest, tmp_dir: Path) -> None:
    """Move the staged partial files to where the update looks for them (renames)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        staged = part_path(staging.dir, entry)
        if staged.exists():
            staged.replace(part_path(tmp_dir, entry))


def _previous_dir(state: StateStore) -> Path:
    return state.dir / PREVIOUS_DIR


def _keep_previous(manager: StorageManager, current: Manifest, new: Manifest) -> None:
    """Hard-link every file ``new`` replaces, and keep ``current``'s manifest bytes."""
    folder = _previous_dir(manager.state)
    forget_previous(manager.state)
    folder.mkdir(parents=True)
    for entry in new.files:
        old = current.file(entry.path)
        if old is None or old.sha256 == entry.sha256:
            continue
        src = manager.root / entry.path
        try:
            os.link(src, part_path(folder, old), follow_symlinks=False)
        except OSError as exc:  # a file system without hard links: no rollback for it
            _log.warning("cannot keep the previous file", path=entry.path, error=str(exc))
    atomic_write_bytes(folder / "release.json", dump_manifest(current), tmp_dir=folder)


def previous_kept(state: StateStore) -> bool:
    """Whether an apply kept the previous release: the trusted one is then on trial,
    not yet loaded by the engines (applied at this boot, or by a run killed before
    its engines loaded it), and :func:`restore_previous` can still put it back."""
    return (_previous_dir(state) / "release.json").is_file()


def forget_previous(state: StateStore) -> None:
    """Drop the files a live apply kept (the new release has served)."""
    folder = _previous_dir(state)
    with contextlib.suppress(FileNotFoundError):
        for item in folder.iterdir():
            item.unlink(missing_ok=True)
        folder.rmdir()


async def restore_previous(manager: StorageManager) -> Manifest:
    """Put back the files and the trusted release a live apply replaced.

    The release that failed is remembered as failed (never staged again), the
    restored files' records are dropped, and the store is verified again (its
    report then describes the files served).
    """
    previous = await asyncio.to_thread(_restore, manager)
    manager._release = Release.of(None)  # the trusted one again, loaded on next use
    async for _ in manager.verify():
        pass
    return previous


def _restore(manager: StorageManager) -> Manifest:
    folder = _previous_dir(manager.state)
    data = (folder / "release.json").read_bytes()
    previous = parse_manifest(data)
    failed = manager.state.load_trusted_manifest()
    restored = []
    for entry in previous.files:
        kept = part_path(folder, entry)
        if kept.exists():
            kept.replace(manager.root / entry.path)
            restored.append(entry.path)
    manager.state.forget(restored)
    manager.state.save_trusted_manifest(data)  # deliberately back: it failed to load
    if failed is not None:
        Staging(manager.state).mark_failed(parse_manifest(failed))
    forget_previous(manager.state)
    _log.warning("previous release restored", serial=previous.serial, files=restored)
    return previous
