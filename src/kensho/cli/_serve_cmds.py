"""``kensho up``, ``kensho generate`` and ``kensho status``: the main job and its views.

``up`` boots a verified, self-healing service (``kensho.kernel.Kernel``) and serves the
OpenAI-compatible API; with no arguments it serves the embedded demo model, offline.
``generate`` runs one prompt through the same runtime in-process. ``status`` follows
a running server's status stream.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

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
from kensho.cli._storage_cmds import _size, _StorageProgress
from kensho.errors import ConfigError

if TYPE_CHECKING:
    # Each command loads what it runs on (httpx, the runtime, the kernel) when it runs:
    # declaring the commands, for any other command or --help, costs none of it.
    import httpx
    from rich.table import Table

    from kensho.config import Settings
    from kensho.events import (
        BreakerChange,
        Event,
        ReleaseSnapshot,
        StatusSnapshot,
        StorageRepairStarted,
    )
    from kensho.kernel import Kernel
    from kensho.runtime.engines.base import GenerationRequest
    from kensho.runtime.executor import Priority

__all__ = ["StatusView", "generate", "status", "up"]

_UP_HELP = (
    "Boot Kensho and serve the OpenAI-compatible API.\n\n"
    "Boot verifies every file of the store against its manifest, repairs what is "
    "missing or corrupt from the sources, loads the primary (GPU) and fallback (CPU) "
    "engines behind circuit breakers, then listens. With no arguments it serves the "
    "embedded demo model, fully offline.\n\n"
    "\b\nExamples:\n"
    "  kensho up --port 8000\n"
    "  curl http://127.0.0.1:8000/v1/chat/completions -d "
    '\'{"model": "kensho-demo", "messages": [{"role": "user", "content": "Say hello."}]}\''
    '\n  kensho up --engine mock --api-key "$KENSHO_API_KEY" --host 0.0.0.0'
    "\n\nThe dashboard is at the server's root (http://127.0.0.1:8000/); "
    "kensho status shows the same in a terminal."
    "\n\nStopping: at the first SIGINT (Ctrl-C) or SIGTERM the port stays open and "
    "answers 503 with Retry-After to new requests; requests not yet streaming get that "
    "503 at once; streams in flight get server.shutdown_timeout seconds to finish, and "
    "one that cannot ends with a final error event then data: [DONE]. A second signal "
    "ends them at once."
    "\n\nExit codes: 0 stopped cleanly (every response finished) · 3 bad config · 4 a "
    "required file could not be made good (each is listed) · 5 not enough disk space for "
    "a repair · 6 the manifest failed a trust check · 10 no engine could start, or the "
    "port is taken · 130 (SIGINT) / 143 (SIGTERM) stopped with responses cut short "
    "(second signal, or server.shutdown_timeout reached)."
)


def _override(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """Apply command-line values on top of the settings, validated like the file."""
    from pydantic import ValidationError

    from kensho.config import Settings

    data = settings.model_dump()
    for section, values in sections.items():
        data[section].update({k: v for k, v in values.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"command-line option for {key}: {first['msg']}", key=key) from None


def _settings_for(
    *,
    host: str | None = None,
    port: int | None = None,
    model: Path | None = None,
    manifest: Path | None = None,
    sources: list[str] | None = None,
    engine: str | None = None,
    api_key: str | None = None,
    model_id: str | None = None,
) -> Settings:
    base = state().settings
    storage: dict[str, Any] = {"manifest": manifest}
    if sources:
        storage["sources"] = [*base.storage.sources, *sources]
    return _override(
        base,
        server={"host": host, "port": port, "api_key": api_key},
        model={"dir": model, "engine": engine, "id": model_id},
        storage=storage,
    )


HostOpt = Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")]
PortOpt = Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one).")]
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", help="Store folder holding the model (default: embedded demo)."),
]
ManifestOpt = Annotated[
    Path | None, typer.Option("--manifest", "-m", help="Manifest of the model store.")
]
SourceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--source",
        "-s",
        help="Repair source: folder, file://, http(s)://, s3://, peer+http:// URL or "
        "peer+mdns:// (peers on the LAN).",
    ),
]
ModelIdOpt = Annotated[
    str | None,
    typer.Option(
        "--model-id",
        help="Name clients send as `model` (default: the manifest's name; the demo's is "
        "kensho-demo).",
    ),
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        help="torch (Hugging Face folder), llama (GGUF on llama.cpp) or mock "
        "(fault-injecting engines). torch and llama engines each run in a child process "
        "(KENSHO_MODEL_ISOLATE=false keeps torch in the server's)."
    ),
]


@app.command(help=_UP_HELP)
def up(  # noqa: PLR0917 - Typer maps each parameter to an option
    host: HostOpt = None,
    port: PortOpt = None,
    model: ModelOpt = None,
    manifest: ManifestOpt = None,
    source: SourceOpt = None,
    engine: EngineOpt = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require this Bearer token (or set KENSHO_API_KEY).", show_default=False),
    ] = None,
    model_id: ModelIdOpt = None,
) -> None:
    settings = _settings_for(
        host=host,
        port=port,
        model=model,
        manifest=manifest,
        sources=source,
        engine=engine,
        api_key=api_key,
        model_id=model_id,
    )
    from kensho.cli._announce import check_announce

    check_announce(settings)  # [share] announce: refused before booting if it cannot be
    code = _run_fast(_up(settings))
    raise typer.Exit(code)


def _run_fast(main: Coroutine[Any, Any, int]) -> int:
    """Run the server on uvloop when it is installed (measured: -0.3 ms per request)."""
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or a minimal install
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _booted(settings: Settings, *, listen: bool) -> Kernel:
    """A booted kernel, boot progress rendered; on any failure it is shut down first.

    ``listen`` takes the port before booting, so a port in use fails in a second.
    """
    from kensho.kernel import Kernel  # the server stack loads only for commands that use it

    with _BootProgress() as renderer:
        kernel = Kernel(settings, on_event=renderer.handle)
        try:
            if listen:
                kernel.bind()
            await kernel.boot()
        except BaseException:
            await kernel.shutdown()
            raise
    return kernel


class _BootProgress(_StorageProgress):
    """Boot as a person reads it on a terminal, and as JSON logs only off one.

    On a terminal: progress bars, and one human line per event: a store with every
    file missing is a first install ("installing 8 files (2.1 MiB) from SOURCE"),
    not six "missing" files and a repair; a verdict repeated by the second check
    under the store lock is not printed twice. Off a terminal the components' JSON
    logs say it all; the few verdicts no component logs are logged here, as JSON.
    """

    def __init__(self) -> None:
        from kensho.telemetry import get_logger

        super().__init__(as_json=False)
        self._log = get_logger("cli")
        self.terminal = err_console.is_terminal
        self.first_install = False
        self.install: StorageRepairStarted | None = None
        self.verdict: tuple[bool, dict[str, int]] | None = None

    def handle(self, event: Event) -> None:
        from kensho.events import StorageFileRepaired, StorageVerifyFinished

        line = self._line(event)
        if not self.terminal:
            if line is not None:
                self._log.info(line, status=event.kind)
            return
        if line is not None:
            self.progress.console.print(line, highlight=False, markup=False)
        if isinstance(event, StorageVerifyFinished):
            return  # said by its line, or deliberately not
        if isinstance(event, StorageFileRepaired) and self.first_install:
            return  # the install line and the bars say it
        super().handle(event)

    def _line(self, event: Event) -> str | None:
        """The human line this event deserves here, if it is one of the boot verdicts."""
        from kensho.events import (
            StorageDownloadProgress,
            StorageRepairStarted,
            StorageVerifyFinished,
        )

        if isinstance(event, StorageVerifyFinished):
            verdict = (event.ok, dict(event.counts))
            if verdict == self.verdict:
                return None  # the same check again, under the store lock
            self.verdict = verdict
            found = {status for status, n in event.counts.items() if n}
            self.first_install = not event.ok and found == {"missing"}
            return None if self.first_install else event.message
        if isinstance(event, StorageRepairStarted):
            if not self.first_install:
                return event.message
            self.install = event
        elif isinstance(event, StorageDownloadProgress) and self.install is not None:
            install, self.install = self.install, None
            return (
                f"installing {install.files} files ({_size(install.bytes_needed)}) "
                f"from {event.source}"
            )
        return None


async def _up(settings: Settings) -> int:
    from kensho.cli._announce import UpAnnouncer

    lan = UpAnnouncer(settings)  # [share] announce: from listening to the drain
    try:
        kernel = await _booted(settings, listen=True)
    except OSError as exc:  # the port is taken
        err_console.print(labelled("error:", "bold red", exc))
        return int(ExitCode.ERROR)
    ctx = kernel.context
    assert ctx is not None
    runtime = kernel.runtime
    assert runtime is not None
    if runtime.degraded:
        err_console.print(
            plain(
                f"serving on the fallback engine ({runtime.active_engine.name}): "
                "the primary is unavailable",
                style="yellow",
            )
        )

    def listening(url: str) -> None:
        out_console.print(f"kensho: listening on {url}", highlight=False, markup=False)
        out_console.print(
            f"  model {ctx.model_id} · OpenAI base URL {url}/v1 · health {url}/readyz · "
            f"metrics {url}/metrics · status: kensho status --url {url}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.stdout.flush()
        lan.start(urlsplit(url).port, ctx.drain.stopping)

    try:
        forced_by = await kernel.serve(on_listening=listening)
    except OSError as exc:
        err_console.print(labelled("error:", "bold red", exc))
        return int(ExitCode.ERROR)
    finally:
        await lan.stop()
        await kernel.shutdown()
    # Cut short: the shell's convention for "killed by this signal" (130, 143).
    return int(ExitCode.OK) if forced_by is None else 128 + int(forced_by)


@app.command(
    help="Run one prompt through the runtime in-process (breaker, fallback, executor) "
    "and stream the answer to the terminal.\n\n"
    "\b\nExamples:\n"
    '  kensho generate "Say hello."\n'
    '  kensho generate "Once upon a time" --no-chat --max-tokens 40 --temperature 0.7 --seed 1'
)
def generate(  # noqa: PLR0917 - Typer maps each parameter to an option
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message for chat models).")],
    max_tokens: Annotated[
        int, typer.Option(min=1, max=32768, help="Stop after this many generated tokens.")
    ] = 64,
    priority: Annotated[str, typer.Option(help="critical, high, normal or low.")] = "normal",
    temperature: Annotated[
        float, typer.Option(min=0.0, max=2.0, help="Sampling temperature; 0 is greedy.")
    ] = 0.0,
    seed: Annotated[
        int | None, typer.Option(help="Seed for sampling, for a repeatable answer.")
    ] = None,
    chat: Annotated[bool, typer.Option(help="Send as a chat message (default).")] = True,
    model: ModelOpt = None,
    manifest: ManifestOpt = None,
    source: SourceOpt = None,
    engine: EngineOpt = None,
) -> None:
    from kensho.runtime.engines.base import GenerationRequest
    from kensho.runtime.executor import Priority

    try:
        level = Priority.parse(priority)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--priority") from None
    settings = _settings_for(model=model, manifest=manifest, sources=source, engine=engine)
    if chat:
        request = GenerationRequest.chat(
            [("user", prompt)], max_tokens=max_tokens, temperature=temperature, seed=seed
        )
    else:
        request = GenerationRequest(
            prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed
        )
    run_async(_generate(settings, request, level))


async def _generate(settings: Settings, request: GenerationRequest, priority: Priority) -> None:
    kernel = await _booted(settings, listen=False)
    try:
        assert kernel.executor is not None
        started = time.perf_counter()
        tokens = 0
        engines: set[str] = set()
        async with kernel.executor.submit(request, priority=priority) as handle:
            async for chunk in handle:
                tokens += chunk.tokens
                engines.add(chunk.engine)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        elapsed = time.perf_counter() - started
        err_console.print(
            plain(f"{tokens} tokens in {elapsed:.2f} s on {', '.join(sorted(engines))}", "dim")
        )
    finally:
        await kernel.shutdown()


_STATUS_HELP = (
    "Live view of a running server: engines and breakers (state, last transition and "
    "why), queue depth per priority against capacity, tasks by outcome, integrity, "
    "recent events. It follows the status stream (GET /v1/kensho/status) and redraws "
    "as events and the periodic snapshots arrive.\n\n"
    "The server is the one the settings describe (server.host and server.port, "
    "KENSHO_SERVER_HOST / KENSHO_SERVER_PORT, kensho.toml), unless --url says "
    "otherwise; the API key is server.api_key (KENSHO_API_KEY) unless --api-key.\n\n"
    "\b\nExamples:\n"
    "  kensho status                      # the server of ./kensho.toml\n"
    '  kensho status --url http://10.0.0.5:8000 --api-key "$KEY"\n'
    "  kensho status --once --json | jq .queue\n\n"
    "Exit codes: 0 ok · 1 the server could not be reached or refused the key."
)


@app.command(help=_STATUS_HELP)
def status(
    url: Annotated[
        str | None,
        typer.Option(
            help="Server base URL. Default: http://server.host:server.port from the settings.",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Bearer token of a server started with an API key. Default: server.api_key "
            "(KENSHO_API_KEY).",
            show_default=False,
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Print the first snapshot and exit.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print each event as one JSON line (with --once: the snapshot only)."
        ),
    ] = False,
) -> None:
    import httpx

    server = state().settings.server
    base = (url or _server_url(server.host, server.port)).rstrip("/")
    key = api_key or server.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no request line above the table
    try:
        run_async(_status(base, headers, once=once, as_json=as_json))
    except httpx.HTTPStatusError as exc:
        hint = " (pass --api-key or set KENSHO_API_KEY)" if exc.response.status_code == 401 else ""
        err_console.print(labelled("error:", "bold red", f"{base} refused: {exc}{hint}"))
        raise typer.Exit(ExitCode.FAILED) from None
    except httpx.HTTPError as exc:
        err_console.print(labelled("error:", "bold red", f"cannot reach {base}: {exc}"))
        raise typer.Exit(ExitCode.FAILED) from None
    except ValueError as exc:  # an event this version cannot decode (a renamed field)
        err_console.print(labelled("error:", "bold red", f"{base} sent {exc}"))
        raise typer.Exit(ExitCode.FAILED) from None


def _server_url(host: str, port: int) -> str:
    """Where a local client reaches a server bound to ``host``: a wildcard means here."""
    if host in {"", "0.0.0.0", "::"}:  # noqa: S104 - a bind address, read not bound
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _status(url: str, headers: dict[str, str], *, once: bool, as_json: bool) -> None:
    import httpx
    from rich.live import Live

    from kensho.events import ServerShutdown, StatusSnapshot, decode_event

    view = StatusView()
    timeout = httpx.Timeout(10.0, read=None)
    async with (
        httpx.AsyncClient(headers=headers, timeout=timeout) as client,
        client.stream("GET", f"{url}/v1/kensho/status") as response,
    ):
        if response.status_code != 200:
            await response.aread()
            raise httpx.HTTPStatusError(
                f"HTTP {response.status_code}: {response.text}",
                request=response.request,
                response=response,
            )
        live = not (once or as_json)
        screen = Live(view.render(), console=out_console, auto_refresh=False) if live else None
        with screen if screen is not None else contextlib.nullcontext():
            async for kind, data in _stream_events(response):
                event = decode_event(kind, data)
                if as_json:
                    sys.stdout.buffer.write(orjson.dumps(event.to_dict()) + b"\n")
                    sys.stdout.buffer.flush()
                view.update(event)
                if once and isinstance(event, StatusSnapshot):
                    if not as_json:
                        out_console.print(view.render())
                    return
                if screen is not None:
                    screen.update(view.render(), refresh=True)
                if isinstance(event, ServerShutdown):
                    return


async def _stream_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``(kind, data)`` for each server-sent event of the status stream."""
    kind = "message"
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, orjson.loads(line[6:])


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


class StatusView:
    """The latest snapshot, breaker states as events move them, and the last events.

    Fed decoded events only (:func:`kensho.events.decode_event`): the fields it reads
    are the dataclasses' own, checked by the type checker and the decoder.
    """

    def __init__(self, *, keep: int = 10) -> None:
        self.snapshot: StatusSnapshot | None = None
        self.states: dict[str, str] = {}
        self.changes: dict[str, BreakerChange] = {}
        self.events: deque[Event] = deque(maxlen=keep)

    def update(self, event: Event) -> None:
        """Take in one event of the stream."""
        from kensho.events import BreakerChange, BreakerStateChanged, StatusSnapshot

        if isinstance(event, StatusSnapshot):
            self.snapshot = event
            for b in event.breakers:
                self.states[b.name] = b.state
                if b.last_change is not None:
                    self.changes[b.name] = b.last_change
            return
        self.events.append(event)
        if isinstance(event, BreakerStateChanged):
            self.states[event.breaker] = event.to_state
            self.changes[event.breaker] = BreakerChange(
                from_state=event.from_state,
                to_state=event.to_state,
                reason=event.reason,
                ts=event.ts,
            )

    def rows(self) -> list[tuple[str, str]]:
        """``(what, now)`` pairs, in the order drawn; also what tests read."""
        rows: list[tuple[str, str]] = []
        snap = self.snapshot
        if snap is not None:
            mode = " (degraded: fallback)" if snap.degraded else ""
            rows.append(("model", f"{snap.model} on {snap.active_engine}{mode}"))
            for name, state in self.states.items():
                change = self.changes.get(name)
                since = (
                    f" since {_clock(change.ts)} ({change.reason})" if change is not None else ""
                )
                rows.append((f"breaker {name}", f"{state}{since}"))
            rows.append(("queue", _queue_line(snap)))
            done = " · ".join(f"{k} {v}" for k, v in snap.tasks.items())
            rows.append(("tasks", done))
            if snap.overloaded:
                rows.append(("overloaded", "yes: only critical tasks admitted"))
            if snap.draining:
                rows.append(("draining", "yes: shutting down"))
            integrity = snap.integrity
            counts = ", ".join(f"{n} {s}" for s, n in sorted(integrity.files.items()))
            offline = " · offline" if integrity.offline else ""
            rows.append(("integrity", f"{integrity.status} ({counts or 'no files'}){offline}"))
            if snap.release is not None:
                rows.append(("release", _release_line(snap.release)))
        rows += [("event", f"{_clock(e.ts)} {e.message}") for e in self.events]
        return rows

    def render(self) -> Table:
        from rich.table import Table

        table = Table("what", "now", title="kensho status", show_lines=False)
        for what, now in self.rows():
            table.add_row(plain(what), plain(now))  # server data, never markup
        return table


def _release_line(release: ReleaseSnapshot) -> str:
    """Serial served; the staged one and its progress; the last channel check."""
    text = f"serial {release.current_serial}"
    if release.staged_serial is not None:
        if release.staged_complete:
            when = "applied live" if release.auto_apply else "applied at next boot or sync"
            text += f" · {release.staged_serial} staged ({when})"
        else:
            total = release.staged_total
            text += f" · staging {release.staged_serial}: {_size(release.staged_done)}"
            text += f" of {_size(total)}" if total else ""
    if release.last_check_at is not None:
        detail = f": {release.last_check_detail}" if release.last_check_detail else ""
        text += f" · checked {_clock(release.last_check_at)} ({release.last_check_result}{detail})"
    return text


def _queue_line(snap: StatusSnapshot) -> str:
    from kensho.runtime.executor import Priority

    queue = snap.queue
    order = [p.name for p in sorted(Priority, reverse=True)]  # critical first
    depth = sorted(queue.depth.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)
    per = " · ".join(f"{p.lower()} {n}" for p, n in depth)
    running = ", ".join(f"{e} {n}" for e, n in queue.in_flight.items() if n)
    text = f"{queue.waiting} waiting of {queue.capacity} ({per})"
    return text + (f"; running {running}" if running else "")
