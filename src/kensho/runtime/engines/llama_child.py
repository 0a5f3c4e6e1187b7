"""The child process of :class:`~kensho.runtime.engines.llama_engine.LlamaCppEngine`.

Run as ``python -I llama_child.py FD FLAGS``: a script, not a module of the package,
so the child imports the standard library and ``llama_cpp`` only (it starts in a
fraction of a second and nothing of the server is duplicated in it). ``FD`` is one
end of a ``multiprocessing`` pipe; messages are small pickled tuples. ``FLAGS`` is a
file of :class:`AbortFlags` both processes map.

parent -> child::

    ("load", {"path", "n_ctx", "n_gpu_layers", "n_threads", "n_batch", "require_gpu"})
    ("gen", rid, {"prompt"|"messages"|"embed", "continuation", "max_tokens",
                  "temperature", "top_p", "seed", "window", "logprobs", "top_logprobs",
                  "frequency_penalty", "presence_penalty", "logit_bias", "embed_first",
                  "tools", "grammar", "grammar_param", "abort_slot"})
    ("credit", rid, n)      the consumer read n more tokens: n more may be sent
    ("cancel", rid)

child -> parent::

    ("ready", info) | ("fail", kind, message)                      answer to "load"
    ("tok", rid, text, index, prompt_tokens, logprob)               one per token
    ("end", rid, text, index, prompt_tokens, logprob, finish_reason) last token
    ("emb", rid, index, n_tokens, float32_bytes, last)              one per input
    ("cancelled", rid, aborted_prefill) | ("err", rid, kind, message, param)

``prompt_tokens`` is set on a request's first token only (None after), ``logprob`` when
the request asked for it: ``(token_bytes, logprob, ((bytes, logprob), ...))``, the top
alternatives most likely first. Every request ends with exactly one of ``end``, a last
``emb``, ``cancelled`` or ``err``. Requests are
served one at a time (a ``Llama`` object is not thread-safe) by one thread, which
reads the pipe between tokens, so a stream stops within one token; a prefill is cut
short by llama.cpp's abort callback, which reads the request's abort flag. A request runs at most
``window`` tokens ahead of what its consumer has read (credits, as in HTTP/2 flow
control): a slow or departed client never has hundreds of tokens decoded for nothing.
When the parent's end of the pipe closes (the server died), the child exits at once;
SIGINT and SIGTERM are ignored (the server drains first, then closes the pipe).

Stop strings are matched in the parent (with the same matcher as TorchEngine), which
then cancels the rest: the child stays a thin loop over llama.cpp.

The OpenAI sampling controls follow TorchEngine's ``_sampling.py`` exactly (bias, then
penalties counted over every generated token — continuation included, never the prompt
— then temperature), so a request means the same on both engines of a mixed pair.
llama.cpp's own penalty sampler counts only the last ``last_n_tokens`` accepted tokens
and has no logit bias in ``Llama.generate``, so a :class:`_Scores` logits processor
(first in llama.cpp's sampler chain) does it, and keeps the processed row for the
logprobs. It is installed only when a request asks for one of these: a plain request
runs llama.cpp's sampler chain untouched. Embeddings come from a second context on the
same weights (``embeddings`` on, mean pooling), made on the first embedding request.

Structured output and tool calls arrive as the Lark ``grammar`` the parent compiled
from the request (``kensho.runtime.engines._constraints``, the torch engine's grammar),
and the same processor masks every token llguidance forbids (:class:`_Grammar`); the
llguidance tokenizer is built from the GGUF's own vocabulary, once, on the first
constrained request, and compiled grammars are cached by their text.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import mmap
import os
import pickle
import random
import select
import signal
import socket
import struct
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["AbortFlags", "Channel", "main"]

_GGUF_MAGIC = b"GGUF"
_ABORTED = "llama_decode returned 2"
_EMBED_CONTEXT_MAX = 8192  # tokens: a pooled input must fit one micro-batch
_CACHED_GRAMMARS = 64  # compiled grammars kept (least recently used dropped)
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!iQ")


class Channel:
    """One end of the pipe between the engine and its child, framed as ``Connection``.

    Frames are what ``multiprocessing.connection.Connection.send`` writes (a 4-byte
    big-endian length, or -1 then 8 bytes, then the pickle), so either end may still
    use a plain ``Connection``. Both directions are hot (one message per token), and
    the standard calls are slow for it: ``Connection.send`` builds a ``ForkingPickler``
    per message, ``Connection.poll()`` a selector per call, and a ``recv`` that finds
    nothing raises. Here a send is one ``pickle.dumps`` and one ``send``;
    :meth:`ready` is one ``poll(0)`` on a poller made once (under a microsecond);
    :meth:`take` decodes every complete frame one ``recv`` brings. It works on a
    duplicate of the descriptor, left blocking (``MSG_DONTWAIT`` per non-blocking read).
    """

    def __init__(self, conn: Connection) -> None:
        self._sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = bytearray()
        self._poller = select.poll()
        self._poller.register(self._sock.fileno(), select.POLLIN)

    def send(self, message: tuple[Any, ...]) -> None:
        """Write one message (blocks while the pipe is full: the reader is behind)."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        size = len(data)
        head = _SHORT.pack(size) if size < 0x7FFFFFFF else _LONG.pack(-1, size)
        self._sock.sendall(head + data)

    def ready(self) -> bool:
        """Whether a read would find something (a message, or the other end gone)."""
        return bool(self._buf) or bool(self._poller.poll(0))

    def take(self, *, block: bool) -> list[tuple[Any, ...]] | None:
        """Messages ready now (with ``block``: wait for at least one); None at EOF."""
        messages = self._frames()
        while not messages:
            try:
                data = self._sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return []
            if not data:
                return None
            self._buf += data
            messages = self._frames()
            if not block:
                break
        return messages

    def _frames(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        buf = self._buf
        while len(buf) >= 4:
            (size,) = _SHORT.unpack_from(buf)
            start = 4
            if size == -1:
                if len(buf) < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, 4)
                start = 12
            if len(buf) < start + size:
                break
            out.append(pickle.loads(buf[start : start + size]))  # noqa: S301 - our own pipe
            del buf[: start + size]
        return out

    def close(self) -> None:
        self._sock.close()


class AbortFlags:
    """One byte per request slot, in a file both processes map: a prefill's abort switch.

    llama.cpp calls its abort callback after every graph node of a prefill. A Python
    callback costs about 2 µs a call (a third of the demo model's first token); this
    one is C: libc's ``strlen`` on the request's slot, a byte the parent sets to 1 to
    cancel followed by a byte that stays 0, so it returns exactly 0 or 1. (The
    callback's type is ``bool (*)(void *)``; a ``size_t`` of 0 or 1 is that bool in
    every C ABI that llama.cpp builds for.) The parent raises the flag before it
    sends the ``cancel`` message, so a prefill stops at its next node without waiting
    for the child to read its pipe.
    """

    SLOTS = 1024
    SIZE = 2 * SLOTS

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, self.SIZE)
        self._view: Any = None  # the C view the child's callback reads (see address)

    @classmethod
    def create(cls) -> tuple[AbortFlags, int]:
        """A new, unlinked file of flags (all 0), and its descriptor for the child."""
        with tempfile.TemporaryFile(prefix="kensho-abort-") as file:
            os.ftruncate(file.fileno(), cls.SIZE)
            fd = os.dup(file.fileno())
        return cls(fd), fd

    def address(self, slot: int) -> int:
        """Where a slot's byte is in this process (the child's callback argument)."""
        if self._view is None:
            self._view = ctypes.c_char.from_buffer(self._map)
        return ctypes.addressof(self._view) + 2 * slot

    def close(self) -> None:
        """Unmap (the parent's side; the child's lives as long as the child)."""
        if self._view is None:
            self._map.close()

    def raise_flag(self, slot: int) -> None:
        self._map[2 * slot] = 1

    def clear(self, slot: int) -> None:
        self._map[2 * slot] = 0

    def is_raised(self, slot: int) -> bool:
        return bool(self._map[2 * slot])


class _Invalid(Exception):
    """The request is the client's mistake (too long, a chat the template refuses)."""

    def __init__(
        self, message: str, code: str = "invalid_request", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class _Grammar:
    """One request's llguidance matcher: masks the logits, follows the sampled tokens."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        import numpy as np

        self._np = np
        self._matcher = matcher
        self._bitmask = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)

    @property
    def done(self) -> bool:
        """The grammar is complete: the answer ends here (as the torch engine's does)."""
        return bool(self._matcher.is_stopped())

    def mask(self, scores: Any) -> None:
        """Set every token the grammar forbids next to -inf, in place."""
        np, bitmask = self._np, self._bitmask
        self._matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        if self._matcher.is_error():
            raise RuntimeError(f"constrained decoding failed: {self._matcher.get_error()}")
        width = scores.shape[0]
        bits = min(width, bitmask.size * 32)
        forbidden = np.unpackbits(~bitmask.view(np.uint8), count=bits, bitorder="little")
        scores[:bits][forbidden.view(np.bool_)] = -np.inf
        scores[bits:] = -np.inf  # ids past the vocabulary: never

    def advance(self, tokens: list[int]) -> None:
        """Follow tokens that were sampled (or produced earlier, for a continuation)."""
        if tokens and not self._matcher.consume_tokens(tokens):
            raise RuntimeError(
                f"constrained decoding lost its grammar state: {self._matcher.get_error()}"
            )


class _Scores:
    """The OpenAI logit bias and penalties, as a llama-cpp-python logits processor.

    The same maths as TorchEngine's ``LogitsProcessor`` (see the module doc), in
    numpy; ``last`` keeps the processed row of the latest step for the logprobs.
    """

    def __init__(
        self,
        params: dict[str, Any],
        n_vocab: int,
        generated: list[int],
        grammar: _Grammar | None = None,
    ) -> None:
        import numpy as np

        self._np = np
        self.grammar = grammar
        self.frequency = float(params.get("frequency_penalty") or 0.0)
        self.presence = float(params.get("presence_penalty") or 0.0)
        self.bias: Any = None
        if params.get("logit_bias"):
            self.bias = np.zeros(n_vocab, dtype=np.float32)
            for token_id, value in params["logit_bias"]:
                if not 0 <= token_id < n_vocab:
                    raise _Invalid(
                        f"logit_bias: token id {token_id} is not in this model's "
                        f"vocabulary (0 to {n_vocab - 1})",
                        param="logit_bias",
                    )
                self.bias[token_id] = value
        self.counts: Any = None
        if self.frequency or self.presence:
            self.counts = np.zeros(n_vocab, dtype=np.float32)
            for token_id in generated:
                if 0 <= token_id < n_vocab:
                    self.counts[token_id] += 1
        if grammar is not None:
            grammar.advance(generated)
        self.last: Any = None

    def observe(self, token_id: int) -> None:
        if self.counts is not None and 0 <= token_id < self.counts.shape[0]:
            self.counts[token_id] += 1
        if self.grammar is not None:
            self.grammar.advance([token_id])

    def __call__(self, _input_ids: Any, logits: Any) -> Any:
        scores = self._np.array(logits, dtype=self._np.float32)
        if self.bias is not None:
            scores += self.bias[: scores.shape[0]]
        if self.counts is not None:
            counts = self.counts[: scores.shape[0]]
            scores -= counts * self.frequency + (counts > 0) * self.presence
        if self.grammar is not None:
            self.grammar.mask(scores)
        self.last = scores
        return scores


def _logprob_of(
    scores: Any, token_id: int, n: int, temperature: float, piece: Any
) -> tuple[bytes, float, tuple[tuple[bytes, float], ...]]:
    """``token_id``'s log-probability under ``softmax(scores / temperature)`` and the
    ``n`` most likely tokens with theirs (TorchEngine's ``top_logprobs``)."""
    import numpy as np

    row = scores if temperature == 0 else scores / np.float32(temperature)
    shifted = row - row.max()
    logprobs = shifted - np.log(np.exp(shifted).sum(dtype=np.float32))
    top: tuple[tuple[bytes, float], ...] = ()
    if n > 0:
        n = min(n, logprobs.shape[0])
        ids = np.argpartition(-logprobs, n - 1)[:n]
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        top = tuple((piece(int(i)), float(logprobs[i])) for i in ids)
    return piece(token_id), float(logprobs[token_id]), top


class _Child:
    def __init__(self, conn: Connection, flags: AbortFlags) -> None:
        self.conn = conn
        self.channel = Channel(conn)
        self.flags = flags
        self.jobs: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self.cancelled: set[str] = set()
        self.credit: dict[str, int] = {}
        self.current: str | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.llm: Any = None
        self.template: Any = None
        self.n_ctx = 0
        self.arm_abort: Any = None
        self.embedder: Any = None  # (context, batch), made on the first embedding request
        self.ll_tokenizer: Any = None  # llguidance's, made on the first constrained request
        self.grammars: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.pieces: dict[int, bytes] = {}
        self.spoken: dict[int, bytes | None] = {}  # see speak()
        self._callbacks: list[Any] = []  # ctypes callbacks must outlive their use

    # -- messages from the parent ------------------------------------------------------

    def pump(self, *, block: bool) -> None:
        """Take in what the parent sent; with ``block``, wait for at least one message.

        One thread does everything: it reads the pipe between tokens (a ``poll(0)``,
        then a ``recv`` only when something came) and while waiting for work or credit.
        No reader thread means no thread switch before a first token.
        """
        if not block and not self.channel.ready():
            return  # the common case, between two tokens: one poll(0), nothing to read
        messages = self.channel.take(block=block)
        if messages is None:  # the parent is gone (or closed the pipe): nobody to serve
            os._exit(0)
        for message in messages:
            self.handle(message)

    def handle(self, message: tuple[Any, ...]) -> None:
        if message[0] == "gen":
            self.jobs.append((message[1], message[2]))
        elif message[0] == "credit":
            self.credit[message[1]] = self.credit.get(message[1], 0) + message[2]
        elif message[0] == "cancel":
            rid = message[1]
            if rid == self.current or any(job[0] == rid for job in self.jobs):
                self.cancelled.add(rid)  # not one that ended before the cancel came

    def may_send(self, rid: str) -> bool:
        """Wait for the consumer's credit; False once the request is cancelled."""
        self.pump(block=False)
        while self.credit.get(rid, 0) <= 0 and rid not in self.cancelled:
            self.pump(block=True)
        if rid in self.cancelled:
            return False
        self.credit[rid] -= 1
        return True

    # -- load ---------------------------------------------------------------------------

    def load(self, options: dict[str, Any]) -> None:
        path = str(options["path"])
        with Path(path).open("rb") as f:
            magic = f.read(4)
        if magic != _GGUF_MAGIC:
            raise _LoadFailure("format", f"{path} is not a GGUF file (it starts with {magic!r})")
        import llama_cpp

        self._quiet(llama_cpp)
        if options["require_gpu"] and not llama_cpp.llama_supports_gpu_offload():
            raise _LoadFailure(
                "nogpu", "llama.cpp was built without GPU support or sees no GPU device"
            )
        try:
            self.llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=int(options["n_ctx"]),
                n_gpu_layers=int(options["n_gpu_layers"]),
                n_threads=options["n_threads"],
                n_threads_batch=options["n_threads"],
                n_batch=int(options["n_batch"]),
                n_ubatch=int(options["n_batch"]),
                seed=0,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            reason = self._reason()
            kind = "memory" if "alloc" in reason.lower() or "memory" in reason.lower() else "load"
            if "unknown model architecture" in reason:
                kind = "architecture"
            raise _LoadFailure(kind, f"{path}: {reason or exc}") from exc
        self.n_ctx = int(self.llm.n_ctx())
        trained = int(self.llm._model.n_ctx_train())
        if self.n_ctx > trained:
            raise _LoadFailure(
                "context",
                f"{path}: a context of {self.n_ctx} tokens was asked for, but the model "
                f"was trained for {trained}; use n_ctx <= {trained} (0: the model's own)",
            )
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode(
                "utf-8", "replace"
            )
            bos_id = self.llm.token_bos()
            bos = self.llm.detokenize([bos_id], special=True).decode() if bos_id >= 0 else ""
            self.template = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        self._set_abort(llama_cpp)

    def info(self) -> dict[str, Any]:
        import llama_cpp

        return {
            "n_ctx": self.n_ctx,
            "n_ctx_train": int(self.llm._model.n_ctx_train()),
            "architecture": self.llm.metadata.get("general.architecture", "?"),
            "chat_template": self.template is not None,
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "pid": os.getpid(),
        }

    def _quiet(self, llama_cpp: Any) -> None:
        """llama.cpp's log lines go to a small tail (named in load errors), not stderr."""

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def on_log(level: int, text: bytes, _data: Any) -> None:
            if level in (3, 4):  # ggml: 3 warn, 4 error
                self.log_tail.append(text.decode("utf-8", "replace").strip())

        self._callbacks.append(on_log)
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))

    def _reason(self) -> str:
        lines = [line for line in self.log_tail if line]
        return "; ".join(lines[-3:])

    def _set_abort(self, llama_cpp: Any) -> None:
        """Abort a prefill whose request was cancelled (llama_decode then returns 2).

        Armed while a prompt is read, on the request's :class:`AbortFlags` slot (no
        slot: not abortable, a rare case, see the engine); between tokens the decode
        loop reads its pipe itself.
        """
        strlen = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
        check = llama_cpp.ggml_abort_callback(strlen)
        self._callbacks.append(check)
        ctx, set_callback = self.llm._ctx.ctx, llama_cpp.llama_set_abort_callback
        off = llama_cpp.ggml_abort_callback()  # a NULL function pointer
        address = self.flags.address

        def arm(slot: int | None) -> None:
            if slot is None or slot < 0:
                set_callback(ctx, off, None)
            else:
                set_callback(ctx, check, ctypes.c_void_p(address(slot)))

        self.arm_abort = arm

    # -- generation -----------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            while not self.jobs:
                self.pump(block=True)
            rid, params = self.jobs.popleft()
            self.current = rid
            try:
                if params.get("embed"):
                    self.embed(rid, params)
                else:
                    self.generate(rid, params)
            except _Invalid as exc:
                self.channel.send(("err", rid, "invalid:" + exc.code, str(exc), exc.param))
            except Exception as exc:  # an engine fault: the parent's breaker counts it
                self.channel.send(("err", rid, "engine", f"{type(exc).__name__}: {exc}", None))
            finally:
                self.current = None
                self.cancelled.discard(rid)
                self.credit.pop(rid, None)

    def prompt_tokens(self, params: dict[str, Any]) -> list[int]:
        if params.get("prompt") is not None:
            text, add_bos = str(params["prompt"]), True
        else:
            text, add_bos = self.chat_text(params["messages"], params.get("tools")), False
        text += params["continuation"]
        tokens: list[int] = self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        if len(tokens) >= self.n_ctx:
            raise _Invalid(
                f"the prompt is {len(tokens)} tokens; the model's context is {self.n_ctx} "
                "tokens: shorten it",
                "context_length_exceeded",
            )
        return tokens

    def chat_text(
        self, turns: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The chat through the GGUF's template (turns and tools as transformers passes
        them); a template that cannot show the tools to the model refuses them."""
        if tools and (self.template is None or "tools" not in self.template.template):
            raise _Invalid(
                "this model's chat template does not render tools, so the model would "
                "never see them; serve a model whose template supports tools",
                param="tools",
            )
        if self.template is None:
            return "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"
        try:
            return str(self.template(messages=turns, tools=tools).prompt)
        except Exception as exc:  # jinja2 TemplateError and friends
            raise _Invalid(f"the model's chat template refused these messages: {exc}") from exc

    def generate(self, rid: str, params: dict[str, Any]) -> None:
        # A request cancelled while it waited is not skipped here: its prefill stops at
        # the first graph node through the abort callback, the same path as a long one.
        llm = self.llm
        self.credit[rid] = self.credit.get(rid, 0) + int(params["window"])
        tokens = self.prompt_tokens(params)
        cont = params["continuation"]
        generated = llm.tokenize(cont.encode("utf-8"), add_bos=False, special=True) if cont else []
        start = len(generated)
        prompt_tokens: int | None = len(tokens) - start
        max_tokens = min(int(params["max_tokens"]), self.n_ctx - len(tokens))
        scores = self.scores_for(params, generated)
        seed = params.get("seed")
        llm.set_seed(int(seed) if seed is not None else random.getrandbits(32))
        stream = llm.generate(
            tokens,
            top_k=0,
            top_p=float(params["top_p"]),
            min_p=0.0,
            typical_p=1.0,
            temp=float(params["temperature"]),
            repeat_penalty=1.0,
            logits_processor=None if scores is None else [scores],
        )
        spoken, speak = self.spoken, self.speak
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        send = self.channel.send
        produced = 0
        slot = int(params.get("abort_slot", -1))
        self.arm_abort(slot)
        try:
            for token in stream:
                if not produced:
                    self.arm_abort(None)
                produced += 1
                index = start + produced - 1
                if produced > 1:
                    prompt_tokens = None
                piece = spoken[token] if token in spoken else speak(token)
                if piece is None:  # end of generation: its logprob is not reported (as torch)
                    send(
                        (
                            "end",
                            rid,
                            utf8.decode(b"", final=True),
                            index,
                            prompt_tokens,
                            None,
                            "stop",
                        )
                    )
                    return
                logprob = None if scores is None else self.follow(scores, token, params)
                text = utf8.decode(piece)
                finish = _finish(scores, produced, max_tokens)
                if finish is not None:
                    text += utf8.decode(b"", final=True)
                    send(("end", rid, text, index, prompt_tokens, logprob, finish))
                    return
                if not self.may_send(rid):
                    send(("cancelled", rid, False))
                    return
                send(("tok", rid, text, index, prompt_tokens, logprob))
        except RuntimeError as exc:
            aborted = rid in self.cancelled or (slot >= 0 and self.flags.is_raised(slot))
            if _ABORTED in str(exc) and aborted:
                send(("cancelled", rid, True))
                return
            raise
        finally:
            if not produced:
                self.arm_abort(None)
            stream.close()

    def follow(self, scores: _Scores, token: int, params: dict[str, Any]) -> Any:
        """Count the sampled token (penalties, grammar); its logprob entry, if asked."""
        logprob = self.logprob(scores, token, params)
        scores.observe(token)
        return logprob

    def scores_for(self, params: dict[str, Any], generated: list[int]) -> _Scores | None:
        """The logits processor a request needs (None: llama.cpp's chain as it is)."""
        grammar = self.grammar_for(params)
        wanted = (
            grammar is not None
            or params.get("logprobs")
            or params.get("logit_bias")
            or params.get("frequency_penalty")
            or params.get("presence_penalty")
        )
        n_vocab = int(self.llm.n_vocab())
        return _Scores(params, n_vocab, generated, grammar) if wanted else None

    def grammar_for(self, params: dict[str, Any]) -> _Grammar | None:
        """The request's grammar state: a copy of the cached compiled matcher."""
        grammar = params.get("grammar")
        if not grammar:
            return None
        pristine = self.grammars.get(grammar)
        if pristine is None:
            pristine = self.compile(grammar, str(params.get("grammar_param") or "response_format"))
            self.grammars[grammar] = pristine
            while len(self.grammars) > _CACHED_GRAMMARS:
                self.grammars.popitem(last=False)
        self.grammars.move_to_end(grammar)
        return _Grammar(pristine.deep_copy(), int(self.llm.n_vocab()))

    def compile(self, grammar: str, param: str) -> Any:
        try:
            from llguidance import LLMatcher
            from llguidance.llamacpp import lltokenizer_from_vocab
        except ImportError as exc:
            raise _Invalid(
                "structured output needs llguidance, which is not installed; install it "
                "with: pip install 'kensho[ml]'",
                param=param,
            ) from exc
        if self.ll_tokenizer is None:
            import llama_cpp

            vocab = self.llm._model.vocab
            ends = {llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)}
            self.ll_tokenizer = lltokenizer_from_vocab(
                vocab, n_vocab=int(self.llm.n_vocab()), eos_token=sorted(e for e in ends if e >= 0)
            )
        matcher = LLMatcher(self.ll_tokenizer, LLMatcher.grammar_from_lark(grammar), log_level=0)
        if matcher.is_error():
            raise _Invalid(
                f"{param}: cannot be enforced by constrained decoding: {matcher.get_error()}",
                param=param,
            )
        return matcher

    def logprob(self, scores: _Scores, token: int, params: dict[str, Any]) -> Any:
        """The sampled token's logprob entry, or None when the request did not ask."""
        if not params.get("logprobs") or scores.last is None:
            return None
        n = int(params.get("top_logprobs") or 0)
        return _logprob_of(scores.last, token, n, float(params["temperature"]), self.piece)

    def speak(self, token_id: int) -> bytes | None:
        """What a token adds to the answer's text (special tokens: nothing), None for an
        end-of-generation token; cached, as the two ctypes calls cost more per token
        than the rest of the loop."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token_id):
            self.spoken[token_id] = None
        else:
            self.spoken[token_id] = bytes(self.llm.detokenize([token_id], special=False))
        return self.spoken[token_id]

    def piece(self, token_id: int) -> bytes:
        """A token's exact bytes (special tokens as their text), cached per id."""
        raw = self.pieces.get(token_id)
        if raw is None:
            raw = bytes(self.llm.detokenize([token_id], special=True))
            self.pieces[token_id] = raw
        return raw

    # -- embeddings -----------------------------------------------------------------------

    def embed(self, rid: str, params: dict[str, Any]) -> None:
        """One ``emb`` message per pending input: its mean-pooled, L2-normalised final
        hidden state (TorchEngine's definition), every input checked before the first."""
        context, batch, limit = self.embedding_context()
        encoded = [self.embedding_ids(item, limit) for item in params["embed"]]
        first = int(params.get("embed_first") or 0)
        import llama_cpp
        import numpy as np

        n_embd = int(self.llm.n_embd())
        for offset, ids in enumerate(encoded):
            self.pump(block=False)
            if rid in self.cancelled:
                self.channel.send(("cancelled", rid, False))
                return
            batch.reset()
            context.kv_cache_clear()
            batch.add_sequence(ids, 0, True)
            context.decode(batch)
            pointer = llama_cpp.llama_get_embeddings_seq(context.ctx, 0)
            vector = np.ctypeslib.as_array(pointer, shape=(n_embd,)).astype(np.float32)
            vector /= np.float32(max(float(np.linalg.norm(vector)), 1e-12))
            last = offset == len(encoded) - 1
            self.channel.send(("emb", rid, first + offset, len(ids), vector.tobytes(), last))

    def embedding_ids(self, item: str | tuple[int, ...], limit: int) -> list[int]:
        """The token ids of one input; bad input is the client's (``input``)."""
        if isinstance(item, str):
            ids = list(self.llm.tokenize(item.encode("utf-8"), add_bos=True, special=True))
        else:
            ids, n_vocab = list(item), int(self.llm.n_vocab())
            bad = next((i for i in ids if not 0 <= i < n_vocab), None)
            if bad is not None:
                raise _Invalid(
                    f"input: token id {bad} is not in this model's vocabulary (0 to {n_vocab - 1})",
                    param="input",
                )
        if not ids:
            raise _Invalid("input: an input must have at least one token", param="input")
        if len(ids) > limit:
            raise _Invalid(
                f"input: an input is {len(ids)} tokens; the model's context is {limit} "
                "tokens: shorten it",
                "context_length_exceeded",
                param="input",
            )
        return ids

    def embedding_context(self) -> tuple[Any, Any, int]:
        """A second llama.cpp context on the same weights, in embedding mode with mean
        pooling; the whole input in one micro-batch (pooling needs it so)."""
        if self.embedder is None:
            import llama_cpp
            from llama_cpp import _internals as internals

            size = min(self.n_ctx, _EMBED_CONTEXT_MAX)
            params = llama_cpp.llama_context_default_params()
            for name, _ in type(params)._fields_:
                setattr(params, name, getattr(self.llm.context_params, name))
            params.n_ctx = params.n_batch = params.n_ubatch = size
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            context = internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
            batch = internals.LlamaBatch(n_tokens=size, embd=0, n_seq_max=1, verbose=False)
            self.embedder = (context, batch, size)
        return self.embedder  # type: ignore[no-any-return]


def _finish(scores: _Scores | None, produced: int, max_tokens: int) -> str | None:
    """Why the answer ends after this token: its grammar is complete ("stop", as the
    torch engine ends it), its budget is spent ("length"), or not yet (None)."""
    if scores is not None and scores.grammar is not None and scores.grammar.done:
        return "stop"
    return "length" if produced >= max_tokens else None


class _LoadFailure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def main(argv: list[str]) -> int:
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group:
    # the server drains its requests first, then closes the pipe, which ends this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(argv[1]))
    child = _Child(conn, AbortFlags(int(argv[2])))
    batch = child.channel.take(block=True) or [("eof",)]
    first = batch[0]
    for message in batch[1:]:
        child.handle(message)
    if first[0] != "load":
        child.channel.send(("fail", "protocol", f"expected a load message, got {first[0]!r}"))
        return 2
    try:
        child.load(first[1])
    except _LoadFailure as exc:
        child.channel.send(("fail", exc.kind, str(exc)))
        return 1
    except OSError as exc:
        child.channel.send(("fail", "file", f"{first[1]['path']}: {exc.strerror or exc}"))
        return 1
    except ImportError as exc:
        child.channel.send(("fail", "import", f"llama-cpp-python is not installed ({exc})"))
        return 1
    except Exception as exc:  # anything else llama-cpp-python raises while loading
        child.channel.send(("fail", "load", f"{first[1]['path']}: {type(exc).__name__}: {exc}"))
        return 1
    child.channel.send(("ready", child.info()))
    child.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
