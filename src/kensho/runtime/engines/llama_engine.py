"""LlamaCppEngine: GGUF models on llama.cpp, each engine in its own child process.

Why a process and not a thread: a CUDA error inside llama.cpp calls ``abort()``, which
no Python code can catch, and a ``Llama`` object is not thread-safe. So the model lives
in a child (``llama_child.py``) that this engine starts, feeds over a pipe and watches.
When the child dies (abort, out of memory, SIGKILL) the pipe closes: every request in
flight ends with :class:`~kensho.errors.EngineCrashedError`, which the breaker counts
and the fallback absorbs (before the first token the user sees nothing; after it, the
fallback continues the text). The next request — the breaker's probe — starts a new
child. The server itself never goes down with the model.

The hand-off is kept cheap: the event loop watches the pipe with ``add_reader`` and, at
each wake-up, drains every message that is ready, so a burst of tokens costs one
wake-up rather than one loop callback per token. Each token is its own chunk while
the consumer keeps up; tokens that queued up while it was away come as one chunk
(``GenerationChunk.tokens`` says how many). The child frames its messages itself
(:class:`~kensho.runtime.engines.llama_child.Channel`): per token it costs one
``poll(0)``, one ``pickle.dumps`` and one ``send``.

The child serves one request at a time, in arrival order; a cancelled request (the
consumer stopped reading) stops within one token, and a cancelled prompt stops during
its prefill (llama.cpp's abort callback).

It honours every OpenAI feature TorchEngine does (:data:`~kensho.runtime.engines.base.
FEATURES`), with the same meaning, so a mixed pair (torch and llama) fails over without
changing an answer's sense: the prompt's token count on the first chunk, logprobs of
the distribution each token was drawn from, logit bias and penalties counted over the
continuation too, and mean-pooled normalised embeddings (see ``llama_child.py``).
Structured output and tool calls use the torch engine's grammar
(:func:`~kensho.runtime.engines._constraints.grammar_for`): this side compiles the
request to its Lark text and checks its schemas (a keyword llguidance cannot enforce is
a 400 naming the field), the child masks each step with llguidance.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from array import array
from collections.abc import AsyncGenerator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from kensho.errors import (
    EngineError,
    EngineOutOfMemoryError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelFileError,
)
from kensho.runtime.engines._constraints import check_schemas, grammar_for
from kensho.runtime.engines._process import ChildEngine, ChildProcess, Credit, Stream
from kensho.runtime.engines.base import (
    FEATURES,
    EngineKind,
    Feature,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TokenLogprob,
)
from kensho.runtime.engines.llama_child import AbortFlags
from kensho.runtime.engines.structured import template_messages
from kensho.runtime.engines.torch_engine import StopMatcher
from kensho.telemetry import get_logger

__all__ = ["WINDOW", "LlamaCppEngine"]

log = get_logger("runtime.engine.llama")

_CHILD_SCRIPT = Path(__file__).with_name("llama_child.py")
_FINAL = frozenset({"end", "cancelled", "err", "dead"})
#: Tokens the child may decode ahead of the consumer; credit is returned in halves.
WINDOW = 32
_CHECKED_GRAMMARS = 64  # grammars whose schemas passed check_schemas (LRU)


class _Child(ChildProcess):
    """One running llama.cpp child, with the abort flags of its requests."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        conn: Connection,
        flags: AbortFlags,
        *,
        engine: str,
        dispatch: Callable[[ChildProcess, tuple[Any, ...]], None],
    ) -> None:
        self.flags = flags
        self.free_slots = list(range(AbortFlags.SLOTS - 1, -1, -1))
        super().__init__(proc, conn, engine=engine, what="llama.cpp process", dispatch=dispatch)

    async def reap(self) -> None:
        await super().reap()
        self.flags.close()


class LlamaCppEngine(ChildEngine[_Child]):
    """A GGUF file served by llama.cpp (``llama-cpp-python``) in a child process.

    ``device="cuda"`` makes a GPU engine that offloads every layer (``n_gpu_layers``
    defaults to all) and whose ``load()`` raises a permanent
    :class:`EngineUnavailableError` when llama.cpp has no GPU support or sees no
    device, so the runtime starts on the fallback and says so once. ``n_ctx`` 0 means
    the model's own context; ``n_threads`` None lets llama.cpp choose.
    """

    supports_continuation = True
    features: frozenset[Feature] = FEATURES
    #: A ``Llama`` object serves one sequence at a time: the executor never gives this
    #: engine more than one slot, whatever ``[runtime] concurrency`` says, so queued
    #: requests wait in the executor's queue (priority, shedding, Retry-After) rather
    #: than inside the child where their first-token timeout would run out.
    max_concurrency = 1

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "cpu",
        name: str | None = None,
        n_ctx: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int | None = None,
    ) -> None:
        super().__init__()
        if n_ctx < 0 or n_batch < 1:
            raise ValueError(f"n_ctx must be >= 0 and n_batch >= 1, got {n_ctx}, {n_batch}")
        self.model_path = Path(model_path)
        self.device = device
        self.kind: EngineKind = "gpu" if device.startswith("cuda") else "cpu"
        self.name = name or self.kind
        self._options: dict[str, Any] = {
            "path": str(self.model_path),
            "n_ctx": n_ctx,
            "n_threads": n_threads,
            "n_batch": n_batch,
            "n_gpu_layers": (-1 if n_gpu_layers is None else n_gpu_layers)
            if self.kind == "gpu"
            else 0,
            "require_gpu": self.kind == "gpu",
        }
        self._checked: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.prefills_aborted = 0

    @property
    def context_length(self) -> int:
        """The context the loaded model serves (0 before the first load)."""
        return int(self._child.info.get("n_ctx", 0)) if self._child is not None else 0

    # -- lifecycle -----------------------------------------------------------------------

    async def _start(self) -> None:
        if not self.model_path.is_file():
            raise EngineUnavailableError(
                f"engine {self.name!r}: {self.model_path} does not exist; run `kensho verify` "
                "on the store, or point [model] gguf at the file"
            )
        proc, conn, flags = await asyncio.to_thread(self._spawn)
        child = _Child(proc, conn, flags, engine=self.name, dispatch=self._dispatch)
        info = await self._hello(child, self._options)
        log.info(
            "engine loaded",
            engine=self.name,
            device=self.device,
            model=str(self.model_path),
            pid=child.proc.pid,
            n_ctx=info.get("n_ctx"),
            gpu_offload=info.get("gpu_offload"),
        )

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Connection, AbortFlags]:
        try:
            flags, flags_fd = AbortFlags.create()
        except OSError as exc:
            raise EngineUnavailableError(
                f"engine {self.name!r}: cannot make its abort flags file: {exc}"
            ) from exc
        try:
            proc, conn = ChildProcess.spawn(
                lambda fd: [sys.executable, "-I", str(_CHILD_SCRIPT), str(fd), str(flags_fd)],
                engine=self.name,
                what="llama.cpp process",
                pass_fds=(flags_fd,),
            )
        except BaseException:
            flags.close()
            raise
        finally:
            os.close(flags_fd)  # the parent's map holds its own reference
        return proc, conn, flags

    def _observe(
        self, child: ChildProcess, message: tuple[Any, ...], stream: Stream | None, final: bool
    ) -> None:
        assert isinstance(child, _Child)
        kind = message[0]
        if kind in ("tok", "end"):
            self.tokens_generated += 1
        elif kind == "cancelled" and message[2]:
            self.prefills_aborted += 1
        if final and stream is not None and stream.slot >= 0:
            child.free_slots.append(stream.slot)  # the child is done with it

    # -- errors ----------------------------------------------------------------------------

    async def _load_error(self, answer: tuple[Any, ...], child: _Child) -> EngineError:
        where = f"engine {self.name!r}"
        if answer[0] == "dead":
            return await child.crash_error("while loading " + str(self.model_path))
        kind, message = str(answer[1]), str(answer[2])
        if kind in ("format", "architecture", "context", "load"):
            return ModelFileError(f"{where}: cannot serve {message}", path=self.model_path)
        if kind == "memory":
            return EngineOutOfMemoryError(f"{where}: out of memory loading {message}")
        if kind in ("nogpu", "import"):
            hint = (
                "the CPU fallback will serve instead"
                if kind == "nogpu"
                else "install it with: pip install 'kensho[llama]'"
            )
            return EngineUnavailableError(f"{where}: {message}; {hint}", permanent=True)
        return EngineUnavailableError(f"{where}: {message}")

    # -- generation ----------------------------------------------------------------------

    def _open(
        self, child: _Child, rid: str, request: GenerationRequest
    ) -> tuple[Stream, tuple[Any, ...]]:
        params = _params(request, self._grammar(request))  # bad input raises here
        # No free slot (a thousand requests queued in one child): its prefill cannot
        # be cut short, the rest works the same.
        slot = child.free_slots.pop() if child.free_slots else -1
        if slot >= 0:
            child.flags.clear(slot)
        params["abort_slot"] = slot
        return Stream(slot), ("gen", rid, params)

    async def _read(
        self, child: _Child, rid: str, stream: Stream, request: GenerationRequest
    ) -> AsyncGenerator[GenerationChunk, None]:
        """The chunks of one request's messages; returns once its last message is read.

        One chunk per token while the consumer keeps up; the tokens that arrived while
        it was away (queued in ``stream``) come as one chunk.
        """
        stops = StopMatcher(request.stop)
        credit = Credit(child, rid, WINDOW)
        while True:
            message = await stream.get()
            kind = message[0]
            if kind in ("tok", "end"):
                batch = [message]
                queued = stream.messages
                while kind == "tok" and queued and queued[0][0] in ("tok", "end"):
                    message = queued.popleft()
                    kind = message[0]
                    batch.append(message)
                chunk = self._tokens(batch, stops)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                credit.read(chunk.tokens)
            elif kind == "emb":
                yield self._vector(message)
                if message[5]:
                    return
            else:
                raise await self._stream_error(child, message, request)

    def _tokens(self, batch: list[tuple[Any, ...]], stops: StopMatcher) -> GenerationChunk:
        """``tok`` messages (maybe an ``end`` last) as one chunk, cut at a stop string."""
        texts: list[str] = []
        finish: FinishReason | None = None
        taken = 0
        for message in batch:
            taken += 1
            text, stopped = stops.feed(message[2])
            texts.append(text)
            if stopped:
                finish = "stop"
                break
            if message[0] == "end":
                texts.append(stops.flush())
                finish = message[6]
        used = batch[:taken]
        last = used[-1]
        return GenerationChunk(
            text="".join(texts),
            index=last[3],
            engine=self.name,
            finish_reason=finish,
            prompt_tokens=next((m[4] for m in used if m[4] is not None), None),
            logprobs=tuple(_token_logprob(m[5]) for m in used if m[5] is not None),
            tokens=taken,
        )

    def _grammar(self, request: GenerationRequest) -> str | None:
        """The Lark grammar the answer must follow (None: free), its schemas checked once
        (checking costs milliseconds; applications send the same schema again and again)."""
        grammar = grammar_for(request)
        if grammar is None:
            return None
        if grammar in self._checked:
            self._checked.move_to_end(grammar)
        else:
            check_schemas(request)
            self._checked[grammar] = None
            while len(self._checked) > _CHECKED_GRAMMARS:
                self._checked.popitem(last=False)
        return grammar

    def _before_cancel(self, child: _Child, stream: Stream) -> None:
        """The abort flag first: a prefill under way stops at its next graph node."""
        if stream.slot >= 0:
            child.flags.raise_flag(stream.slot)

    @staticmethod
    def _is_final(message: tuple[Any, ...]) -> bool:
        return _is_final(message)

    def _vector(self, message: tuple[Any, ...]) -> GenerationChunk:
        """An ``emb`` message: the vector of one input, float32 on the pipe."""
        return GenerationChunk(
            text="",
            index=message[2],
            engine=self.name,
            finish_reason="stop" if message[5] else None,
            prompt_tokens=message[3],
            embedding=tuple(array("f", message[4])),
        )

    async def _stream_error(
        self, child: _Child, message: tuple[Any, ...], request: GenerationRequest
    ) -> Exception:
        if message[0] == "dead":
            return await child.crash_error(f"during request {request.request_id}")
        if message[0] == "cancelled":
            return EngineError(f"engine {self.name!r}: request {request.request_id} was cancelled")
        kind, text = str(message[2]), str(message[3])
        if kind.startswith("invalid:"):
            return InvalidRequestError(text, code=kind.removeprefix("invalid:"), param=message[4])
        return EngineError(
            f"engine {self.name!r} failed during request {request.request_id}: {text}"
        )


def _is_final(message: tuple[Any, ...]) -> bool:
    """Whether ``message`` is the last one of its request (see ``llama_child.py``)."""
    return message[0] in _FINAL or (message[0] == "emb" and bool(message[5]))


def _token_logprob(entry: tuple[Any, ...]) -> TokenLogprob:
    """The child's ``(bytes, logprob, ((bytes, logprob), ...))`` as a TokenLogprob."""
    raw, logprob, top = entry
    return TokenLogprob(
        token=raw.decode("utf-8", "replace"),
        logprob=logprob,
        token_bytes=raw,
        top=tuple((b.decode("utf-8", "replace"), lp, b) for b, lp in top),
    )


def _params(request: GenerationRequest, grammar: str | None) -> dict[str, Any]:
    """What the child needs of a request (plain data: it crosses a pipe)."""
    pending = request.pending_embeddings if request.embed else ()
    return {
        "prompt": request.prompt,
        "messages": template_messages(request.messages),
        "tools": [tool.to_openai() for tool in request.tools] or None,
        "grammar": grammar,
        "grammar_param": "tools" if request.tools else "response_format",
        "embed": list(pending),
        "embed_first": len(request.embed) - len(pending),
        "continuation": request.continuation,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "window": WINDOW,
        "logprobs": request.logprobs,
        "top_logprobs": request.top_logprobs,
        "frequency_penalty": request.frequency_penalty,
        "presence_penalty": request.presence_penalty,
        "logit_bias": list(request.logit_bias),
    }
