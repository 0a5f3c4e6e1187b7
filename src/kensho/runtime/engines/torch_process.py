"""TorchProcessEngine: a TorchEngine in its own child process, the server's default.

Why a process, for an engine whose errors Python can catch:

- **The GIL.** transformers' decode step is mostly interpreter time on small and
  mid-sized models, and in the server's process it shares one GIL with the event
  loop, which wakes for every token (to stream it) and for every other request. Each
  wake-up then waits for the decode thread to let go of the GIL, and the decode thread
  waits for the loop: on the demo model that cost 80 to 750 µs a token. In a child, the
  decode loop has its process to itself and hands each token over with one pickle and
  one pipe write; the server reads on its own core. vLLM's V1 engine split its
  engine core from the API server for the same reason.
- **CUDA.** A device-side assert or an illegal memory access leaves the process's CUDA
  context unusable until the process ends. In a child, that is an engine failure like
  any other (:class:`~kensho.errors.EngineCrashedError` once the child exits): the
  breaker counts it, the fallback absorbs it, and the next probe starts a new process
  with a fresh context. A SIGKILL by the OOM killer is the same.

The child (``torch_child.py``) runs the very same :class:`TorchEngine` code, so the
text, logprobs, embeddings and constrained answers are identical to the in-process
engine's (``[model] isolate = false`` keeps it in the server's process). Tokens that
queued up while the consumer was away come as one chunk; a consumer that stops reading
stops the decode within one token (and the child never runs more than ``WINDOW``
chunks ahead of its reader).
"""

from __future__ import annotations

import asyncio
import json
import sys
from array import array
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from kensho.errors import EngineError, EngineUnavailableError
from kensho.runtime.engines._process import ChildEngine, ChildProcess, Credit, Stream
from kensho.runtime.engines.base import (
    FEATURES,
    EngineKind,
    Feature,
    GenerationChunk,
    GenerationRequest,
    merge_chunks,
)
from kensho.runtime.engines.torch_engine import check_dtype
from kensho.telemetry import get_logger

__all__ = ["WINDOW", "TorchProcessEngine"]

log = get_logger("runtime.engine.torch")

#: Chunks the child may send ahead of the consumer; credit is returned in halves.
WINDOW = 32
_WHAT = "torch process"
#: The child's first line: the server's own ``sys.path`` (so it imports the same
#: Kensho, torch and transformers, whatever the working directory holds), then serve.
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from kensho.runtime.engines.torch_child import main; sys.exit(main(sys.argv[2:]))"
)
#: Device nodes of the GPU drivers torch's CUDA (or ROCm) build can use; with none of
#: them, no CUDA device can exist, and no child needs to import torch to find out.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


class TorchProcessEngine(ChildEngine[ChildProcess]):
    """A Hugging Face causal LM folder served by :class:`TorchEngine` in a child process.

    Same arguments as :class:`~kensho.runtime.engines.torch_engine.TorchEngine`, plus
    ``threads`` (torch's intra-op threads in the child; None: torch's default).
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
        threads: int | None = None,
    ) -> None:
        super().__init__()
        check_dtype(dtype)
        self.model_dir = Path(model_dir)
        self.device = device
        self.kind: EngineKind = "gpu" if device.startswith("cuda") else "cpu"
        self.name = name or self.kind
        self.dtype_name = dtype
        self._options: dict[str, Any] = {
            "model_dir": str(self.model_dir),
            "device": device,
            "dtype": dtype,
            "name": self.name,
            "max_concurrency": max_concurrency,
            "threads": threads,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def _start(self) -> None:
        self._check_before_spawn()
        proc, conn = await asyncio.to_thread(
            ChildProcess.spawn,
            lambda fd: [sys.executable, "-I", "-c", _BOOT, json.dumps(sys.path), str(fd)],
            engine=self.name,
            what=_WHAT,
        )
        child = ChildProcess(proc, conn, engine=self.name, what=_WHAT, dispatch=self._dispatch)
        info = await self._hello(child, self._options)
        self.dtype_name = info.get("dtype", self.dtype_name)
        log.info(
            "engine loaded",
            engine=self.name,
            device=self.device,
            dtype=self.dtype_name,
            model_dir=str(self.model_dir),
            pid=child.pid,
        )

    async def _load_error(self, answer: tuple[Any, ...], child: ChildProcess) -> EngineError:
        if answer[0] == "dead":
            return await child.crash_error(f"while loading {self.model_dir}")
        error: EngineError = answer[1]  # the child's own, pickled
        return error

    def _check_before_spawn(self) -> None:
        """What the server can tell without a child (one costs seconds: it imports torch)."""
        if self.kind == "gpu" and sys.platform == "linux":
            if not any(Path(node).exists() for node in _GPU_NODES):
                raise EngineUnavailableError(
                    f"engine {self.name!r}: no GPU device on this machine (none of "
                    f"{', '.join(_GPU_NODES)}); the CPU fallback will serve instead",
                    permanent=True,
                )
        if not (self.model_dir / "config.json").is_file():
            raise EngineUnavailableError(
                f"engine {self.name!r}: {self.model_dir} is not a model folder "
                "(config.json is missing); run `kensho verify` on the store"
            )

    def _observe(
        self,
        child: ChildProcess,
        message: tuple[Any, ...],
        stream: Stream | None,
        final: bool,
    ) -> None:
        if message[0] == "tok":
            self.tokens_generated += 1

    # -- generation ----------------------------------------------------------------------

    def _open(
        self, child: ChildProcess, rid: str, request: GenerationRequest
    ) -> tuple[Stream, tuple[Any, ...]]:
        return Stream(), ("gen", rid, request, WINDOW)

    async def _read(
        self, child: ChildProcess, rid: str, stream: Stream, request: GenerationRequest
    ) -> AsyncGenerator[GenerationChunk, None]:
        """The chunks of one request's messages; returns once its last message is read."""
        credit = Credit(child, rid, WINDOW)
        while True:
            message = await stream.get()
            kind = message[0]
            if kind == "tok":
                batch = [message]
                queued = stream.messages
                while message[4] is None and queued and queued[0][0] == "tok":
                    message = queued.popleft()
                    batch.append(message)
                chunk = self._tokens(batch)
            elif kind == "emb":
                chunk = self._vector(message)
            elif kind == "end":
                return
            elif kind == "err":
                raise message[2]
            else:
                raise await child.crash_error(f"during request {request.request_id}")
            yield chunk
            if chunk.finish_reason is not None:
                return
            credit.read(chunk.tokens)

    def _tokens(self, batch: list[tuple[Any, ...]]) -> GenerationChunk:
        """``tok`` messages as one chunk (several: the consumer was behind)."""
        chunks = [
            GenerationChunk(
                text=m[2],
                index=m[3],
                engine=self.name,
                finish_reason=m[4],
                prompt_tokens=m[5],
                logprobs=m[6],
            )
            for m in batch
        ]
        return merge_chunks(chunks)[0]  # tokens of one engine merge into one chunk

    def _vector(self, message: tuple[Any, ...]) -> GenerationChunk:
        """An ``emb`` message: the vector of one input, float32 on the pipe."""
        return GenerationChunk(
            text="",
            index=message[2],
            engine=self.name,
            finish_reason=message[5],
            prompt_tokens=message[3],
            embedding=tuple(array("f", message[4])),
        )

    @staticmethod
    def _is_final(message: tuple[Any, ...]) -> bool:
        return _is_final(message)


def _is_final(message: tuple[Any, ...]) -> bool:
    """Whether ``message`` is the last one of its request (see ``torch_child.py``)."""
    kind = message[0]
    if kind == "tok":
        return message[4] is not None
    if kind == "emb":
        return message[5] is not None
    return kind in ("end", "err", "dead")
