"""The Kernel: boot sequence and graceful shutdown of a Kensho service.

Boot, in order (``../shared/DESIGN.md``):

1. **integrity** — ``StorageManager.initialize_and_verify()`` checks every file of the
   store, repairs what it can from the sources, and either reports the store ready
   (``ok`` or ``degraded``) or raises :class:`~kensho.errors.IntegrityError` listing
   each required file that could not be made good. Nothing loads before this passes,
   so a model is never served from corrupt weights.
2. **engines** — the primary (CUDA) and fallback (CPU) engines load behind their
   breakers; a primary that cannot run here is announced once and the service starts
   on the fallback.
3. **executor** — the bounded priority queue in front of the runtime.
4. **server** — the HTTP API (:meth:`serve`), with a graceful shutdown on SIGINT or
   SIGTERM: the port stays open and answers 503 to new work, requests that have not
   started get 503 at once, streams in flight get ``shutdown_timeout`` seconds to
   finish and otherwise end with a final error event; a second signal cuts the drain
   short (:class:`~kensho.server.Drain`).

Over-the-air releases (docs/releases.md): a release staged by an earlier run is
applied at boot, before step 1, with no network needed; after boot, with
``storage.update_interval`` set, a :class:`~kensho.storage.updates.ReleaseUpdater`
polls the sources' release channels in the background and stages what is new; a
staged release is applied live (``storage.auto_apply``, or ``POST
/v1/kensho/update``) by :class:`~kensho._live_apply.LiveApplier`.

The kernel owns the service's one :class:`~kensho.hub.EventHub` and hands it to the
storage manager, the runtime manager and the executor, so every event (integrity
progress, breaker transitions, overload) goes through it as it happens: to the
``on_event`` callback (the CLI renders it), to the log (the hub's log listener), and
to the status stream of the server, which replays how the boot went.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from kensho._live_apply import LiveApplier
from kensho.config import Settings
from kensho.demo import DEMO_MANIFEST, DEMO_MODEL_DIR
from kensho.errors import ConfigError, KenshoError
from kensho.events import Event
from kensho.hub import EventHub
from kensho.runtime.engines.base import Engine
from kensho.runtime.engines.faulty import MockCPUEngine, MockGPUEngine
from kensho.runtime.engines.llama_engine import LlamaCppEngine
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.engines.torch_process import TorchProcessEngine
from kensho.runtime.executor import TaskExecutor
from kensho.runtime.manager import RuntimeManager
from kensho.server import ChunkService, Drain, IntegrityState, ServerContext, create_app
from kensho.storage import (
    MirrorSource,
    StorageManager,
    VerifyReport,
)
from kensho.storage.prefetch import Staging, apply_staged_at_start
from kensho.storage.updates import ReleaseStatus, ReleaseUpdater
from kensho.telemetry import get_logger, log_service, span, traced

__all__ = ["Kernel"]

log = get_logger("kernel")

EventCallback = Callable[[Event], None]


def _integrity(report: VerifyReport | None, offline: bool) -> IntegrityState:
    """The store's state for health and metrics: the report's verdict (decided by the
    storage side), with every file that needs repair."""
    if report is None:
        return IntegrityState()
    problems = {f.path: f.status.value for f in report.files if f.needs_repair}
    return IntegrityState(
        status=report.status,
        files={k: v for k, v in report.counts().items() if v},
        problems=problems,
        offline=offline,
        checked_at=time.time(),
    )


#: After the drain, how long uvicorn waits for responses to finish writing (seconds).
_CLOSE_GRACE = 2


class _Server(uvicorn.Server):
    """uvicorn, with Kensho's drain between the first signal and closing the port.

    uvicorn stops listening at the first signal, then cancels the request tasks still
    running at ``timeout_graceful_shutdown`` (500s, cut streams and a stack dump per
    request). Here the listening socket stays open through the drain
    (:class:`~kensho.server.Drain`: new requests get 503, streams finish or end with
    an error event), and only then does uvicorn's own shutdown close the port and the
    idle connections. Any second SIGINT or SIGTERM cuts the drain short (uvicorn only
    counts SIGINT), and the signal is not re-raised afterwards, so the kernel still
    closes engines and flushes logs; :attr:`forced_by` tells the exit code.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Drain,
        drain_timeout: float,
        on_started: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_timeout = drain_timeout
        self._on_started = on_started
        self._signals: list[int] = []
        self._clean = True

    @property
    def forced_by(self) -> signal.Signals | None:
        """The last signal received, when the drain had to cut responses short."""
        if self._clean or not self._signals:
            return None
        return signal.Signals(self._signals[-1])

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Still listening: whatever arrives during the drain gets its 503.
        self._clean = await self._drain.finish(self._drain_timeout, grace=_CLOSE_GRACE)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the main thread inside the logging lock: it
        # only sets flags here, and everything else runs later on the event loop.
        self._signals.append(sig)
        if self.should_exit:
            self.force_exit = True
            self._later(self._force)
            return
        self.should_exit = True
        self._later(self._drain.begin)

    def _force(self) -> None:
        name = signal.Signals(self._signals[-1]).name
        self._drain.cut_off(f"second signal ({name})")

    def _later(self, callback: Callable[[], None]) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback)


class Kernel:
    """Boots storage, engines and executor from settings, then serves them.

    ``on_event`` is called for every event of the service (a listener on :attr:`hub`).
    """

    def __init__(self, settings: Settings, *, on_event: EventCallback | None = None) -> None:
        self.settings = settings
        self.on_event = on_event
        self.hub = EventHub()
        if on_event is not None:
            self.hub.add_listener(on_event)
        self.storage = self._make_storage()
        self.runtime: RuntimeManager | None = None
        self.executor: TaskExecutor | None = None
        self.context: ServerContext | None = None
        self._socket: socket.socket | None = None
        self.release: ReleaseStatus | None = None
        self.updater: ReleaseUpdater | None = None
        self._updater_task: asyncio.Task[None] | None = None
        self._applier = LiveApplier(
            self.storage,
            lambda: self.runtime,
            lambda: self.executor,
            self.hub,
            drain_timeout=settings.server.shutdown_timeout,
        )

    # -- wiring ------------------------------------------------------------------------

    @property
    def uses_demo(self) -> bool:
        """True when no model store is configured: serve the embedded demo model."""
        return self.settings.model.dir is None and self.settings.storage.manifest is None

    def _make_storage(self) -> StorageManager:
        if self.uses_demo:
            return StorageManager.from_settings(
                self.settings,
                root=self.settings.storage.root / "demo",
                manifest=DEMO_MANIFEST,
                first_sources=[MirrorSource(DEMO_MODEL_DIR)],
                hub=self.hub,
            )
        return StorageManager.from_settings(
            self.settings, root=self.settings.model.dir, hub=self.hub
        )

    def _make_engines(self) -> tuple[Engine, Engine]:
        model = self.settings.model
        if model.engine == "mock":
            primary: Engine = MockGPUEngine(
                time_to_first_token=model.mock_time_to_first_token,
                time_per_token=model.mock_time_per_token,
            )
            fallback: Engine = MockCPUEngine(
                time_to_first_token=model.mock_time_to_first_token * 5,
                time_per_token=model.mock_time_per_token * 5,
            )
            return primary, fallback
        fallback_kind = model.fallback_engine or model.engine
        torch_engine = TorchProcessEngine if model.isolate else TorchEngine
        if model.engine == "llama":
            primary = LlamaCppEngine(
                self._store_file(model.gguf, "model.gguf"), device=model.primary_device, name="gpu"
            )
        else:
            primary = torch_engine(
                self.storage.root, device=model.primary_device, dtype=model.dtype, name="gpu"
            )
        if fallback_kind == "llama":
            file, key = (
                (model.fallback_gguf, "model.fallback_gguf")
                if model.fallback_gguf
                else (
                    model.gguf,
                    "model.gguf",
                )
            )
            fallback = LlamaCppEngine(
                self._store_file(file, key), device=model.fallback_device, name="cpu"
            )
        else:
            fallback = torch_engine(self.storage.root, device=model.fallback_device, name="cpu")
        return primary, fallback

    def _store_file(self, name: str, key: str) -> Path:
        """A file named by the settings, which must lie inside the store."""
        root = self.storage.root.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or path == root:
            raise ConfigError(
                f"{key} = {name!r} is not a file inside the store {root}; name it "
                "relative to the store (e.g. model.gguf)",
                key=key,
            )
        return path

    # -- lifecycle -----------------------------------------------------------------------

    @traced("kensho.boot")
    async def boot(self) -> ServerContext:
        """Verify and repair the store, start the engines and the executor.

        Raises :class:`IntegrityError` when a required file cannot be made good, and
        :class:`EngineUnavailableError` when no engine can start.
        """
        started = time.perf_counter()
        log.info("boot started", root=str(self.storage.root), demo=self.uses_demo)
        if not self.uses_demo:
            await self._apply_staged_at_boot()
        with span("kensho.verify_and_repair"):
            await _drain(self.storage.initialize_and_verify())
        if not self.uses_demo:
            self.release = await self._release_status()
        runtime = await self._start_runtime()
        self.runtime = runtime
        integrity = _integrity(self.storage.report, self.storage.offline)
        self.executor = TaskExecutor.from_settings(runtime, self.settings.runtime, hub=self.hub)
        server = self.settings.server
        self.context = ServerContext(
            runtime=runtime,
            executor=self.executor,
            hub=self.hub,
            model_id=self.settings.model.id or (await self.storage.manifest()).name,
            integrity=integrity,
            verify=self.verify_now,
            api_key=server.api_key,
            protect_metrics=server.protect_metrics,
            host=server.host,
            max_body_bytes=server.max_body_bytes,
            default_max_tokens=self.settings.model.max_tokens,
            request_timeout=server.request_timeout,
            log_counts=log_service().counts,
            export_stats=log_service().export_stats,
            release=self.release.snapshot if self.release is not None else None,
            apply_update=self.apply_update if self.release is not None else None,
            chunks=self._chunk_service(),
        )
        self._start_updater()
        log.info(
            "boot finished",
            seconds=round(time.perf_counter() - started, 3),
            integrity=integrity.status,
            offline=integrity.offline,
            engine=runtime.active_engine.name,
            degraded=runtime.degraded,
        )
        return self.context

    def _new_runtime(self) -> RuntimeManager:
        primary, fallback = self._make_engines()
        return RuntimeManager.from_settings(primary, fallback, self.settings.runtime, hub=self.hub)

    async def _start_runtime(self) -> RuntimeManager:
        """Start the engines; the demo has no releases, a store may have one on trial."""
        if self.uses_demo:
            runtime = self._new_runtime()
            await runtime.start()
            return runtime
        return await self._applier.start_runtime(self._new_runtime)

    # -- over-the-air releases -----------------------------------------------------------

    async def _apply_staged_at_boot(self) -> None:
        """Apply a release staged by an earlier run, offline, before verifying.

        Skipped when boot is given a newer manifest than the staged one (that update
        wins). A staged release that fails here is reported and boot goes on with
        the trusted release. One that applies keeps the previous files until the
        engines loaded it: if they cannot, :meth:`_start_runtime` puts them back.
        """
        await apply_staged_at_start(self.storage, how="boot", emit=self.hub.emit, keep=True)

    async def _release_status(self) -> ReleaseStatus:
        manifest = await self.storage.manifest()
        status = ReleaseStatus(
            current_serial=manifest.serial, auto_apply=self.settings.storage.auto_apply
        )
        staging = Staging(self.storage.state)
        staged = await asyncio.to_thread(staging.manifest)
        if staged is not None and staged.serial > manifest.serial:
            complete = await asyncio.to_thread(staging.complete)
            status.seed_staged(staged.serial, complete=complete is not None)
        self.hub.add_listener(status.observe)
        return status

    def _start_updater(self) -> None:
        """Poll the release channels in the background, when configured to."""
        storage = self.settings.storage
        if self.release is None or storage.update_interval <= 0 or not self.storage.sources:
            return
        self.updater = ReleaseUpdater(
            self.storage,
            interval=storage.update_interval,
            emit=self.hub.emit,
            rate=storage.prefetch_rate,
            auto_apply=storage.auto_apply,
            apply=self._apply_live,
        )
        self._updater_task = asyncio.create_task(self.updater.run(), name="kensho-releases")

    async def _apply_live(self) -> None:
        """``storage.auto_apply``: apply what was just staged (failures are reported)."""
        try:
            await self.apply_release(how="live")
        except KenshoError as exc:
            log.warning("live apply failed; the store stays on its release", reason=str(exc))

    async def apply_release(self, *, how: str) -> bool:
        """Apply the staged release now, engines reloaded; whether one was applied."""
        applied = await self._applier.apply(how=how)
        if self.context is not None:
            self.context.integrity = _integrity(self.storage.report, self.storage.offline)
        return applied is not None

    async def apply_update(self) -> dict[str, Any]:
        """``POST /v1/kensho/update``: apply the staged release; the release state.

        Raises what the apply raised (the route answers 409 with it).
        """
        applied = await self.apply_release(how="request")
        snapshot = self.release.snapshot() if self.release is not None else None
        return {
            "applied": applied,
            "serial": snapshot.current_serial if snapshot is not None else None,
            "release": dataclasses.asdict(snapshot) if snapshot is not None else None,
        }

    def _chunk_service(self) -> ChunkService | None:
        """The store's verified chunks for peers, unless ``share.enabled`` is off."""
        share = self.settings.share
        return ChunkService.for_store(self.storage.root, share) if share.enabled else None

    @traced("kensho.verify")
    async def verify_now(self) -> IntegrityState:
        """Re-hash the whole store (admin endpoint); events go to the hub."""
        await _drain(self.storage.verify(full=True))
        return _integrity(self.storage.report, self.storage.offline)

    def bind(self) -> socket.socket:
        """Take the listening port now: a port in use fails in a second, before boot.

        Verifying a store and loading a model can take minutes; finding out after
        all that that the port was taken would waste them.
        """
        if self._socket is None:
            self._socket = _bind(self.settings.server.host, self.settings.server.port)
        return self._socket

    async def serve(
        self, *, on_listening: Callable[[str], None] | None = None
    ) -> signal.Signals | None:
        """Serve HTTP until SIGINT/SIGTERM, then drain and stop.

        Returns None after a clean stop (every response finished within
        ``server.shutdown_timeout``), else the signal that forced the exit (a second
        signal, or the first when the drain timed out): ``kensho up`` exits 128 + it.
        """
        ctx = self.context
        if ctx is None:
            raise RuntimeError("boot() must succeed before serve()")
        settings = self.settings.server
        sock = self.bind()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"
        config = uvicorn.Config(
            create_app(ctx),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=_CLOSE_GRACE,
        )

        def started() -> None:
            log.info("listening", url=url, model=ctx.model_id)
            if on_listening is not None:
                on_listening(url)

        server = _Server(
            config, drain=ctx.drain, drain_timeout=settings.shutdown_timeout, on_started=started
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()
            self._socket = None
        return server.forced_by

    async def shutdown(self) -> None:
        """Cancel what is left, close engines, store and logs. Safe to call twice."""
        if self.context is not None:
            self.context.begin_shutdown()
        if self._updater_task is not None:
            self._updater_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._updater_task
            self._updater_task = None
        if self.executor is not None:
            await self.executor.aclose()
        if self.runtime is not None:
            await self.runtime.close()
        await self.storage.aclose()
        if self.context is not None and self.context.chunks is not None:
            self.context.chunks.close()
        if self._socket is not None:  # bound, but boot failed before serving
            self._socket.close()
            self._socket = None
        log.info("shutdown complete")
        log_service().flush()


async def _drain(events: AsyncIterator[Event]) -> None:
    """Run a storage operation to its end: its events reach the hub as they happen."""
    async for _ in events:
        pass


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so port 0 works and we know the real port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
