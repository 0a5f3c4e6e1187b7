"""TorchEngine: real inference with transformers, on CUDA (primary) or CPU (fallback).

The model folder is loaded with ``local_files_only=True``: Kensho never reaches a hub,
and the folder is expected to come from a verified store (the kernel verifies before
it loads). Generation is a hand-written decoding loop over the KV cache rather than
``model.generate()``, because the runtime needs what ``generate`` does not give:

- one chunk per token, handed to the event loop as soon as it exists (all the chunks
  ready at one loop wake-up are taken together, see ``_handoff``, and yielded as one
  chunk: the loop was behind);
- cancellation within one token when the consumer stops reading;
- stop strings that are never half-emitted;
- continuation of a stream another engine started (the prompt plus the text already
  produced), so a GPU failure mid-stream costs the user nothing;
- the OpenAI sampling controls (logit bias, frequency/presence penalties) and the
  logprobs of the distribution each token was actually drawn from (``_sampling.py``).

Embedding requests (``GenerationRequest.embedding``) are answered with the
mean-pooled, L2-normalised last hidden state of the same model, one input at a time:
batching would pad, and padding changes the floats, while the same text must always
give the same vector.
- constrained decoding (JSON schemas, tool calls) by masking the logits at every step
  with llguidance (see ``_constraints``).

The loop runs in the engine's own worker threads (torch releases the GIL in its
kernels), so the event loop never blocks on a forward pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

from kensho.errors import (
    EngineError,
    EngineOutOfMemoryError,
    EngineUnavailableError,
    InvalidRequestError,
)
from kensho.runtime.engines._constraints import ConstraintCompiler, Guide
from kensho.runtime.engines._handoff import ThreadHandoff
from kensho.runtime.engines._sampling import LogitsProcessor, sampling_scores, top_logprobs
from kensho.runtime.engines._token_text import TokenText
from kensho.runtime.engines.base import (
    FEATURES,
    EmbeddingInput,
    EngineKind,
    Feature,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TokenLogprob,
    merge_chunks,
)
from kensho.runtime.engines.structured import template_messages
from kensho.telemetry import get_logger

__all__ = ["WINDOW", "IncrementalDetokenizer", "StopMatcher", "TorchEngine", "check_dtype"]

log = get_logger("runtime.engine.torch")

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
#: Chunks the worker may decode ahead of its consumer before it waits (back-pressure).
WINDOW = 32
#: One model load at a time per process, imports included: neither transformers' lazy
#: first import ("module 'transformers' has no attribute ...") nor ``from_pretrained``
#: (it builds the model on torch's "meta" device by switching process-wide defaults)
#: is thread-safe, and the runtime loads its two engines at once.
_LOAD_LOCK = threading.Lock()
#: What the worker hands the loop: a chunk, the exception it raised, or None (done).
_Item = GenerationChunk | BaseException | None


def check_dtype(dtype: str | None) -> None:
    """A weights dtype both torch engines accept (None: the device's default)."""
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    Byte-level tokenizers may put one UTF-8 character across several tokens; decoding
    them one at a time would emit replacement characters. Like text-generation-
    inference, decode a small window and only emit once it no longer ends in U+FFFD.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""  # decode of ids[prefix:read], cached between pushes

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            return delta
        return ""


class StopMatcher:
    """Holds back text that could be the start of a stop string.

    ``feed`` returns what is safe to emit now and whether a stop string was reached
    (the stop string itself and anything after it are never emitted).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        pending = self._pending + text
        if not self._stops:
            return pending, False
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(pending)), 0, -1):
                if pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """At the end of a stream, whatever was held back is plain text after all."""
        pending, self._pending = self._pending, ""
        return pending


class _Prepared(NamedTuple):
    input_ids: Any
    max_tokens: int
    start: int
    generator: Any
    processor: LogitsProcessor
    guide: Guide | None


def _shape_logits(logits: Any, processor: LogitsProcessor, guide: Guide | None) -> Any:
    """The scores to sample from: bias and penalties first, then the grammar's mask,
    so a token the grammar forbids stays forbidden whatever its bias."""
    if processor.active:
        logits = processor(logits)
    if guide is not None:
        guide.fill()
        logits = guide.apply(logits)
    return logits


class TorchEngine:
    """A Hugging Face causal LM folder served with transformers on ``device``.

    ``device="cuda"`` (or ``cuda:N``) makes a GPU engine whose ``load()`` raises
    :class:`EngineUnavailableError` when no CUDA device exists, so the runtime starts
    on the fallback and says so once. ``dtype`` defaults to bfloat16 on GPUs that
    support it (float16 otherwise) and float32 on CPU.
    """

    supports_continuation = True
    features: frozenset[Feature] = FEATURES

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        name: str | None = None,
        max_concurrency: int = 4,
    ) -> None:
        check_dtype(dtype)
        self.model_dir = Path(model_dir)
        self.device = device
        self.kind: EngineKind = "gpu" if device.startswith("cuda") else "cpu"
        self.name = name or self.kind
        self.dtype_name = dtype
        self._max_concurrency = max_concurrency
        self._model: Any = None
        self._tokenizer: Any = None
        self._token_text: TokenText | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache_kwarg = "cache"
        self._step_kwargs: dict[str, Any] = {"use_cache": True}
        self._stop_ids: frozenset[int] = frozenset()
        self._constraints: ConstraintCompiler | None = None
        self._loading: asyncio.Task[None] | None = None
        self._active: set[ThreadHandoff[_Item]] = set()  # hand-offs of running requests
        self._count_lock = threading.Lock()
        self.tokens_generated = 0

    @property
    def loaded(self) -> bool:
        return self._model is not None and self._pool is not None

    # -- lifecycle -----------------------------------------------------------------

    async def load(self) -> None:
        """Load tokenizer and weights onto the device, off the event loop.

        Single-flight and cancellation-safe: concurrent callers share one load, and a
        caller cancelled by a timeout (a breaker probe) does not abandon it half-way;
        the engine becomes usable once the weights are on the device.
        """
        if self.loaded:
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_concurrency, thread_name_prefix=f"kensho-{self.name}"
        )
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self.load_blocking)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        self._pool = pool
        log.info(
            "engine loaded",
            engine=self.name,
            device=self.device,
            dtype=self.dtype_name,
            model_dir=str(self.model_dir),
        )

    def load_blocking(self) -> None:
        """What :meth:`load` runs in a worker thread (``torch_child`` calls it directly).

        One load at a time per process (:data:`_LOAD_LOCK`), imports included.
        """
        with _LOAD_LOCK:
            self._load_locked()

    def _load_locked(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise EngineUnavailableError(
                f"engine {self.name!r} needs PyTorch and transformers, which are not "
                f"installed ({exc.name}); install them with: pip install 'kensho[ml]'",
                permanent=True,
            ) from exc

        _quiet_transformers()
        if self.kind == "gpu" and not torch.cuda.is_available():
            raise EngineUnavailableError(
                f"engine {self.name!r}: no CUDA device on this machine (torch "
                f"{torch.__version__}); the CPU fallback will serve instead",
                permanent=True,
            )
        if not (self.model_dir / "config.json").is_file():
            raise EngineUnavailableError(
                f"engine {self.name!r}: {self.model_dir} is not a model folder "
                "(config.json is missing); run `kensho verify` on the store"
            )
        if self.dtype_name is None:
            if self.kind == "gpu":
                bf16 = torch.cuda.is_bf16_supported()
                self.dtype_name = "bfloat16" if bf16 else "float16"
            else:
                self.dtype_name = "float32"
        dtype = getattr(torch, self.dtype_name)
        try:
            tokenizer: Any = transformers.AutoTokenizer.from_pretrained(
                self.model_dir, local_files_only=True
            )
            model: Any = transformers.AutoModelForCausalLM.from_pretrained(
                self.model_dir, local_files_only=True, dtype=dtype
            )
            model.to(self.device)
            model.eval()
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise EngineOutOfMemoryError(
                f"engine {self.name!r}: out of memory loading {self.model_dir} on "
                f"{self.device}: {exc}"
            ) from exc
        except Exception as exc:  # any load failure (bad weights, bad config) is one kind
            raise EngineUnavailableError(
                f"engine {self.name!r}: cannot load {self.model_dir} on {self.device}: {exc}"
            ) from exc
        # Every end-of-sequence id the model knows: chat models end a turn with a token
        # (<|eot_id|>, <end_of_turn>) listed in generation_config, not as the tokenizer's.
        stop_ids = {tokenizer.eos_token_id}
        configured = getattr(model.generation_config, "eos_token_id", None)
        stop_ids.update(configured if isinstance(configured, list) else [configured])
        self._stop_ids = frozenset(i for i in stop_ids if isinstance(i, int))
        # transformers 5 renamed the KV-cache argument; accept both generations.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._step_kwargs = {"use_cache": True}
        if "logits_to_keep" in params:  # skip the LM head on all but the last position
            self._step_kwargs["logits_to_keep"] = 1
        vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._constraints = ConstraintCompiler(tokenizer, vocab_size, self._stop_ids)
        self._tokenizer, self._model = tokenizer, model
        self._token_text = TokenText(tokenizer)

    async def close(self) -> None:
        """Drop the weights (and cached GPU memory); ``load()`` may be called again.

        Running requests are told to stop, and the wait for their current step happens
        in a thread, so closing never blocks the event loop.
        """
        for handoff in tuple(self._active):
            handoff.cancel()
        pool, self._pool = self._pool, None
        self._model = self._tokenizer = None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        if self.kind == "gpu":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def health(self) -> bool:
        return self.loaded

    # -- generation ----------------------------------------------------------------

    def prompt_text(self, request: GenerationRequest) -> str:
        """The text the model continues: chat template or plain prompt, plus continuation.

        A chat the model's template refuses (roles it does not know, turns that do not
        alternate) is the client's mistake: :class:`InvalidRequestError`, never an
        engine failure that would open the breaker.
        """
        if request.prompt is not None:
            base = request.prompt
        elif template := getattr(self._tokenizer, "chat_template", None):
            tools = [tool.to_openai() for tool in request.tools] or None
            if tools and "tools" not in str(template):
                raise InvalidRequestError(
                    "this model's chat template does not render tools, so the model "
                    "would never see them; serve a model whose template supports tools",
                    param="tools",
                )
            try:
                base = self._tokenizer.apply_chat_template(
                    template_messages(request.messages),
                    tools=tools,
                    add_generation_prompt=True,
                    tokenize=False,
                )
            except Exception as exc:  # jinja2 TemplateError and friends
                raise InvalidRequestError(
                    f"the model's chat template refused these messages: {exc}"
                ) from exc
        else:
            base = request.text_input + "\nassistant:"
        return str(base) + request.continuation

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one chunk per token; stops within one token when the consumer stops."""
        if not self.loaded or self._pool is None:
            raise EngineUnavailableError(
                f"engine {self.name!r} is not loaded; call load() before generate()"
            )
        loop = asyncio.get_running_loop()
        handoff: ThreadHandoff[_Item] = ThreadHandoff(loop, window=WINDOW)
        self._active.add(handoff)
        put, cancel = handoff.put, handoff.cancelled

        def work() -> None:
            try:
                self.run_blocking(request, put, cancel)
            except BaseException as exc:  # handed to the consumer, re-raised there
                put(exc)
            else:
                put(None)

        # The worker runs in a copy of this context, so its logs keep the request id.
        future = loop.run_in_executor(self._pool, contextvars.copy_context().run, work)
        try:
            while True:
                # Every chunk ready at this wake-up: several mean the loop was behind,
                # and they go on as one chunk (merge_chunks).
                # The worker's end (None or its error) is always its last item.
                items = await handoff.take()
                for chunk in merge_chunks([i for i in items if isinstance(i, GenerationChunk)]):
                    yield chunk
                last = items[-1]
                if last is None:
                    return
                if isinstance(last, BaseException):
                    raise last
        finally:
            handoff.cancel()
            self._active.discard(handoff)
            await asyncio.shield(future)

    def run_blocking(
        self,
        request: GenerationRequest,
        put: Callable[[GenerationChunk], None],
        cancel: threading.Event,
    ) -> None:
        """One request on this thread: each chunk to ``put`` as it exists; raises what fails.

        Returns after the last chunk, or within one token once ``cancel`` is set. The
        streaming :meth:`generate` runs it in the engine's worker threads;
        ``torch_child`` runs it in a child process.
        """
        if request.embed:
            self._embed(request, put, cancel)
        else:
            self._decode(request, put, cancel)

    def _prepare(self, request: GenerationRequest, model: Any, tokenizer: Any) -> _Prepared:
        """Tokens in, token budget, first chunk index and RNG; bad input is the client's."""
        import torch

        text = self.prompt_text(request)
        # A plain prompt gets the tokenizer's BOS like in training; a chat template
        # already wrote its own.
        bos = request.prompt is not None
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=bos).input_ids
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        max_tokens = request.max_tokens
        if context:
            room = context - input_ids.shape[1]
            if room < 1:
                raise InvalidRequestError(
                    f"the prompt is {input_ids.shape[1]} tokens; the model's context "
                    f"is {context} tokens: shorten it",
                    code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, room)
        generated = (
            tokenizer.encode(request.continuation, add_special_tokens=False)
            if request.continuation
            else []
        )
        processor = LogitsProcessor(
            request, _vocab_size(model), device=self.device, generated=generated
        )
        generator = None
        if request.seed is not None:
            try:
                generator = torch.Generator(device=self.device).manual_seed(request.seed)
            except (ValueError, RuntimeError, OverflowError) as exc:
                raise InvalidRequestError(f"seed {request.seed} cannot be used: {exc}") from exc
        return _Prepared(
            input_ids.to(self.device),
            max_tokens,
            len(generated),
            generator,
            processor,
            self._guide(request, generated),
        )

    def _guide(self, request: GenerationRequest, produced: list[int]) -> Guide | None:
        """The request's grammar guide, already past the text a continuation carries."""
        if self._constraints is None or not request.constrained:
            return None
        guide = self._constraints.guide(request, pinned=self.kind == "gpu")
        if guide is not None:
            guide.advance(produced)
        return guide

    def _weights(self) -> tuple[Any, Any]:
        """The model and tokenizer a worker decodes with (gone: closed mid-request)."""
        model, tokenizer = self._model, self._tokenizer
        if model is None or tokenizer is None:
            raise EngineUnavailableError(f"engine {self.name!r} was closed during a request")
        return model, tokenizer

    def _decode(
        self,
        request: GenerationRequest,
        put: Callable[[GenerationChunk], None],
        cancel: threading.Event,
    ) -> None:
        import torch
        from transformers import DynamicCache

        model, tokenizer = self._weights()
        prepared = self._prepare(request, model, tokenizer)
        ids, max_tokens, start, generator, processor, guide = prepared
        prompt_tokens = int(ids.shape[1]) - start
        stop_ids = self._stop_ids
        detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        stops = StopMatcher(request.stop)
        step_kwargs = {**self._step_kwargs, self._cache_kwarg: DynamicCache(config=model.config)}
        produced = 0

        logprobs: tuple[TokenLogprob, ...] = ()

        def chunk(text: str, finish: FinishReason | None = None) -> GenerationChunk:
            index = start + produced - 1
            return GenerationChunk(
                text=text,
                index=index,
                engine=self.name,
                finish_reason=finish,
                prompt_tokens=prompt_tokens if produced == 1 else None,
                logprobs=logprobs,
            )

        try:
            with torch.inference_mode():
                while not cancel.is_set():
                    # On a GPU the forward pass runs on while the CPU computes the
                    # grammar's mask: the logits are only waited for by apply().
                    out = model(input_ids=ids, **step_kwargs)
                    logits = _shape_logits(out.logits[:, -1, :], processor, guide)
                    next_ids = _sample(logits, request, generator)
                    next_id = int(next_ids.item())
                    produced += 1
                    processor.observe(next_id)
                    with self._count_lock:
                        self.tokens_generated += 1
                    if next_id in stop_ids:  # its logprob is not reported: no text
                        logprobs = ()
                        put(chunk(stops.flush(), "stop"))
                        return
                    if request.logprobs:
                        logprobs = (self._logprob(logits, next_id, request),)
                    safe, stopped = stops.feed(detok.push(next_id))
                    if guide is not None:
                        guide.advance([next_id])
                    if stopped or (guide is not None and guide.done):
                        # A complete grammar ends the answer like the model's own end.
                        put(chunk(safe if stopped else safe + stops.flush(), "stop"))
                        return
                    if produced >= max_tokens:
                        put(chunk(safe + stops.flush(), "length"))
                        return
                    put(chunk(safe))
                    ids = next_ids
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise EngineOutOfMemoryError(
                f"engine {self.name!r}: out of memory on {self.device} during request "
                f"{request.request_id}; cached memory was released"
            ) from exc
        except RuntimeError as exc:
            raise EngineError(
                f"engine {self.name!r} failed on {self.device} during request "
                f"{request.request_id}: {exc}"
            ) from exc

    def _logprob(self, logits: Any, token_id: int, request: GenerationRequest) -> TokenLogprob:
        """The sampled token's logprob and the top alternatives, from the scores it was
        drawn from (see ``_sampling.py``)."""
        assert self._token_text is not None
        scores = sampling_scores(logits, request.temperature)
        chosen, top = top_logprobs(scores, token_id, request.top_logprobs)
        text, raw = self._token_text(token_id)
        alternatives = tuple((*self._token_text(i), lp) for i, lp in top)
        return TokenLogprob(
            token=text,
            logprob=chosen,
            token_bytes=raw,
            top=tuple((t, lp, b) for t, b, lp in alternatives),
        )

    # -- embeddings ------------------------------------------------------------------

    def _embed(
        self,
        request: GenerationRequest,
        put: Callable[[GenerationChunk], None],
        cancel: threading.Event,
    ) -> None:
        """One chunk per pending input, carrying its vector and its token count."""
        import torch

        model, tokenizer = self._weights()
        inputs = request.pending_embeddings
        first = len(request.embed) - len(inputs)
        encoded = [_embedding_ids(item, tokenizer, model) for item in inputs]  # all checked
        try:
            with torch.inference_mode():
                for offset, ids in enumerate(encoded):
                    if cancel.is_set():
                        return
                    hidden = _last_hidden_state(model, torch.tensor([ids], device=self.device))
                    pooled = torch.nn.functional.normalize(hidden.float().mean(dim=1), dim=-1)
                    last = offset == len(encoded) - 1
                    put(
                        GenerationChunk(
                            text="",
                            index=first + offset,
                            engine=self.name,
                            finish_reason="stop" if last else None,
                            prompt_tokens=len(ids),
                            embedding=tuple(float(x) for x in pooled[0].tolist()),
                        )
                    )
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise EngineOutOfMemoryError(
                f"engine {self.name!r}: out of memory on {self.device} embedding request "
                f"{request.request_id}; cached memory was released"
            ) from exc
        except RuntimeError as exc:
            raise EngineError(
                f"engine {self.name!r} failed on {self.device} embedding request "
                f"{request.request_id}: {exc}"
            ) from exc


def _vocab_size(model: Any) -> int:
    """How many token ids the model scores (its LM head's width)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _embedding_ids(item: EmbeddingInput, tokenizer: Any, model: Any) -> list[int]:
    """The token ids of one embedding input; bad input is the client's (``input``)."""
    if isinstance(item, str):
        ids = [int(i) for i in tokenizer(item, add_special_tokens=True).input_ids]
    else:
        vocab = _vocab_size(model)
        ids = list(item)
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"input: token id {bad} is not in this model's vocabulary (0 to {vocab - 1})",
                param="input",
            )
    if not ids:
        raise InvalidRequestError("input: an input must have at least one token", param="input")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context and len(ids) > context:
        raise InvalidRequestError(
            f"input: an input is {len(ids)} tokens; the model's context is {context} "
            "tokens: shorten it",
            code="context_length_exceeded",
            param="input",
        )
    return ids


def _last_hidden_state(model: Any, input_ids: Any) -> Any:
    """The final layer's hidden states ``[1, T, H]`` (after the model's last norm)."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        return base(input_ids=input_ids, use_cache=False).last_hidden_state
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def _quiet_transformers() -> None:
    """Send transformers' own log lines through Kensho's pipeline, without progress bars."""
    from transformers.utils import logging as hf_logging_module

    hf_logging: Any = hf_logging_module
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def _sample(logits: Any, request: GenerationRequest, generator: Any) -> Any:
    """The next token as a ``[1, 1]`` tensor on the model's device.

    Greedy at temperature 0, else temperature + nucleus (top-p) sampling. Staying a
    tensor lets it feed the next step without a host round trip.
    """
    import torch

    if request.temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > request.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)
