"""The child process of :class:`~kensho.runtime.engines.torch_process.TorchProcessEngine`.

It runs one :class:`~kensho.runtime.engines.torch_engine.TorchEngine` (the same decode
loop, sampling, constraints and embeddings as in the server) and serves it over one
end of a ``multiprocessing`` pipe, framed by
:class:`~kensho.runtime.engines.llama_child.Channel`.

parent -> child::

    ("load", {"model_dir", "device", "dtype", "name", "max_concurrency", "threads"})
    ("gen", rid, GenerationRequest, window)
    ("credit", rid, n)      the consumer read n more chunks: n more may be sent
    ("cancel", rid)

child -> parent::

    ("ready", {"dtype"}) | ("fail", EngineError)                    answer to "load"
    ("tok", rid, text, index, finish_reason, prompt_tokens, logprobs)   one per token
    ("emb", rid, index, prompt_tokens, float32_bytes, finish_reason)    one per input
    ("end", rid)            a request that stopped without a last chunk (cancelled)
    ("err", rid, exception)

A request ends with exactly one of: a ``tok`` or ``emb`` whose ``finish_reason`` is
set, ``end``, or ``err``. The main thread reads the pipe; each request decodes on one
of ``max_concurrency`` worker threads, which write their own messages (one
``pickle.dumps`` and one ``send`` per token, under a lock). So the decode loop shares
its process's GIL with nobody busy: the pipe reader wakes only for a new request, a
cancel, or credit (every ``window // 2`` chunks). A request runs at most ``window``
chunks ahead of what its consumer has read, and stops within one token of a cancel.
When the parent's end of the pipe closes (the server exited or died), the child
stops its requests within a token and exits (after at most a few seconds, whatever a
stuck step does).

Terminal and service-manager signals (SIGINT from Ctrl-C, SIGTERM to the whole
control group) are ignored: the server drains its requests first, then closes the
pipe, and that is what ends the child.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import pickle
import signal
import sys
import threading
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from kensho.config import LogSettings
from kensho.errors import EngineError, EngineUnavailableError
from kensho.runtime.engines.base import GenerationChunk, GenerationRequest
from kensho.runtime.engines.llama_child import Channel
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.telemetry import configure_logging

__all__ = ["main"]


#: Seconds the requests under way get to stop once the parent has gone.
_EXIT_GRACE = 5.0


class _Gone(Exception):
    """The parent closed its end of the pipe while a worker was writing to it."""


class _Job:
    """One request's cancel switch and flow-control credit."""

    __slots__ = ("cancel", "credit", "finished", "room")

    def __init__(self, window: int) -> None:
        self.cancel = threading.Event()
        self.credit = window
        self.room = threading.Condition(threading.Lock())
        self.finished = False  # its last chunk was sent

    def spend(self) -> None:
        """Worker side: wait for the consumer's credit (not once cancelled)."""
        with self.room:
            while self.credit <= 0 and not self.cancel.is_set():
                self.room.wait()
            self.credit -= 1

    def give(self, n: int) -> None:
        with self.room:
            self.credit += n
            self.room.notify()

    def stop(self) -> None:
        self.cancel.set()
        with self.room:
            self.room.notify()


class _Server:
    def __init__(self, conn: Connection) -> None:
        self.channel = Channel(conn)
        self._send_lock = threading.Lock()
        self.jobs: dict[str, _Job] = {}
        self.engine: TorchEngine | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            try:
                self.channel.send(message)
            except OSError as exc:  # the parent is gone: nobody to serve
                raise _Gone from exc

    # -- the pipe reader (main thread) ----------------------------------------------------

    def read(self) -> list[tuple[Any, ...]] | None:
        """What the parent sent (waits for it); None once it closed its end."""
        return self.channel.take(block=True)

    def serve(self) -> None:
        """Until the parent closes the pipe (it exited, or it died)."""
        while (messages := self.read()) is not None:
            for message in messages:
                self.handle(message)
        self.stop()

    def stop(self) -> None:
        """Every request stops within a token, then the process exits normally (its
        ``atexit`` work done); a step that never ends does not keep it alive."""
        for job in tuple(self.jobs.values()):
            job.stop()
        watchdog = threading.Timer(_EXIT_GRACE, os._exit, args=(0,))
        watchdog.daemon = True
        watchdog.start()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        watchdog.cancel()

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "gen":
            rid, request, window = message[1], message[2], message[3]
            job = self.jobs[rid] = _Job(window)
            assert self.pool is not None
            self.pool.submit(self.run, rid, request, job)
        elif kind == "credit":
            if (known := self.jobs.get(message[1])) is not None:
                known.give(message[2])
        elif kind == "cancel" and (known := self.jobs.get(message[1])) is not None:
            known.stop()

    # -- a worker -------------------------------------------------------------------------

    def run(self, rid: str, request: GenerationRequest, job: _Job) -> None:
        assert self.engine is not None
        send = self.send

        def put(chunk: GenerationChunk) -> None:
            job.spend()
            if chunk.finish_reason is not None:
                job.finished = True
            if chunk.embedding is None:
                send(
                    (
                        "tok",
                        rid,
                        chunk.text,
                        chunk.index,
                        chunk.finish_reason,
                        chunk.prompt_tokens,
                        chunk.logprobs,
                    )
                )
            else:
                vector = array("f", chunk.embedding).tobytes()
                send(("emb", rid, chunk.index, chunk.prompt_tokens, vector, chunk.finish_reason))

        try:
            try:
                if not job.cancel.is_set():
                    self.engine.run_blocking(request, put, job.cancel)
            except _Gone:
                raise
            except BaseException as exc:  # handed to the parent, raised there
                self.jobs.pop(rid, None)
                send(("err", rid, _portable(exc)))
                return
            self.jobs.pop(rid, None)
            if not job.finished:
                send(("end", rid))
        except _Gone:  # nobody to tell
            self.jobs.pop(rid, None)

    # -- load -----------------------------------------------------------------------------

    def load(self, options: dict[str, Any]) -> dict[str, Any]:
        threads = options.pop("threads", None)
        engine = TorchEngine(Path(options.pop("model_dir")), **options)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        engine.load_blocking()
        self.engine = engine
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=options.get("max_concurrency", 4), thread_name_prefix="kensho-decode"
        )
        return {"dtype": engine.dtype_name}


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives the pipe (Kensho's errors do), else an EngineError saying it."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes
    except Exception:
        return EngineError(f"{type(exc).__name__}: {exc}")
    return exc


def main(argv: list[str]) -> NoReturn:
    """``argv``: the pipe's descriptor. Serves until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Warnings and errors only, as JSON lines on stderr: the server keeps the last one
    # to say how this process died.
    configure_logging(LogSettings(level="warning", format="json"), stream=sys.stderr)
    server = _Server(Connection(int(argv[0])))
    try:
        code = _run(server)
    except _Gone:  # the parent went away while this process answered it
        code = 0
    # Exit now, after the atexit work (a coverage run saves its data there): tearing
    # down torch's and transformers' modules one by one takes about 2 s, which a
    # server's shutdown would wait for.
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _run(server: _Server) -> int:
    batch = server.read()
    if not batch:  # the parent went away before asking anything
        return 0
    first = batch[0]
    if first[0] != "load":
        server.send(("fail", EngineUnavailableError(f"expected a load message, got {first[0]!r}")))
        return 2
    try:
        info = server.load(dict(first[1]))
    except EngineError as exc:
        server.send(("fail", _portable(exc)))
        return 1
    except Exception as exc:  # anything else is a load failure too, said plainly
        server.send(("fail", EngineUnavailableError(f"{type(exc).__name__}: {exc}")))
        return 1
    server.send(("ready", info))
    for message in batch[1:]:
        server.handle(message)
    server.serve()
    return 0
