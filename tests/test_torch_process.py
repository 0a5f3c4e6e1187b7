"""TorchProcessEngine: the torch engine in its own process, on the real demo model.

Its answers must be the in-process engine's to the token (same code, other process),
and its process boundary must behave like llama.cpp's: a SIGKILL is a failover, the
next probe starts a new process, and no child outlives its server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from _chunk_support import (
    cancel_after_first,
    collect,
    leave_after,
    loaded,
    text_of,
    token_indices,
    tokens_of,
)
from _process_support import child_exits_with_its_server
from _schema_support import PERSON, TOOLS
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import EngineCrashedError, EngineUnavailableError, InvalidRequestError
from kensho.runtime.breaker import BreakerState, CircuitBreaker
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines.base import GenerationChunk, GenerationRequest
from kensho.runtime.engines.structured import ResponseFormat
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.engines.torch_process import TorchProcessEngine
from kensho.runtime.manager import RuntimeManager

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="uses pidfds"),
    pytest.mark.asyncio(loop_scope="module"),  # the child's pipe is watched by one loop
]

OPEN = 60.0
NO_GPU_NODES = not any(Path(n).exists() for n in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def child() -> AsyncIterator[TorchProcessEngine]:
    # As many torch threads as this process: a matmul's sums run in the same order, so
    # logprobs and vectors are equal to the last bit.
    engine = TorchProcessEngine(DEMO_MODEL_DIR, threads=torch.get_num_threads())
    async with loaded(engine):
        yield engine


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def inline() -> AsyncIterator[TorchEngine]:
    async with loaded(TorchEngine(DEMO_MODEL_DIR)) as engine:
        yield engine


SAME = {
    "greedy": GenerationRequest(prompt="The GPU", max_tokens=40, temperature=0),
    "seeded sampling": GenerationRequest(prompt="The", max_tokens=30, temperature=1.2, seed=7),
    "stop string": GenerationRequest(prompt="The GPU", max_tokens=40, temperature=0, stop=("CPU",)),
    "continuation": GenerationRequest(
        prompt="The GPU", max_tokens=20, temperature=0, continuation=" is fast."
    ),
    "chat template": GenerationRequest.chat(
        [("user", "Tell me about the GPU.")], max_tokens=30, temperature=0
    ),
    "logprobs, penalties, bias": GenerationRequest(
        prompt="1 2 3",
        max_tokens=20,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        logit_bias=((20, -100.0),),
    ),
    "json schema": GenerationRequest.chat(
        [("user", "Describe a person.")],
        max_tokens=120,
        temperature=0,
        response_format=ResponseFormat("json_schema", PERSON),
    ),
    "tools": GenerationRequest.chat(
        [("user", "What is the weather in Paris?")],
        max_tokens=120,
        temperature=0,
        tools=TOOLS,
        tool_choice="required",
    ),
    "embeddings": GenerationRequest.embedding(["the GPU", "the CPU", (5, 6, 7)]),
}


def _tokens(chunks: list[GenerationChunk]) -> list[tuple[object, ...]]:
    """What a stream says, token by token where it can: chunking is timing, not meaning."""
    return [
        (c.text if c.embedding is None else "", c.finish_reason, c.prompt_tokens, c.embedding)
        for c in chunks
    ]


@pytest.mark.parametrize("case", list(SAME))
async def test_answers_are_the_in_process_engines_exactly(
    child: TorchProcessEngine, inline: TorchEngine, case: str
) -> None:
    request = SAME[case]
    got, want = await collect(child, request), await collect(inline, request)
    assert text_of(got) == text_of(want)
    assert token_indices(got) == token_indices(want)
    assert [c.finish_reason for c in got][-1] == [c.finish_reason for c in want][-1]
    first_prompt = next(c.prompt_tokens for c in got if c.prompt_tokens is not None)
    assert first_prompt == next(c.prompt_tokens for c in want if c.prompt_tokens is not None)
    assert [e for c in got for e in c.logprobs] == [e for c in want for e in c.logprobs]
    vectors = [c.embedding for c in want if c.embedding is not None]
    assert [c.embedding for c in got if c.embedding is not None] == vectors
    assert {c.engine for c in got} == {"cpu"}


async def test_concurrent_requests_keep_their_own_streams(child: TorchProcessEngine) -> None:
    prompts = ["The GPU", "The CPU", "Kensho"]
    alone = [
        text_of(await collect(child, GenerationRequest(prompt=p, max_tokens=25, temperature=0)))
        for p in prompts
    ]
    together = await asyncio.gather(
        *(
            collect(child, GenerationRequest(prompt=p, max_tokens=25, temperature=0))
            for p in prompts
        )
    )
    assert [text_of(chunks) for chunks in together] == alone


async def test_a_consumer_that_stops_reading_stops_the_child_within_one_token(
    child: TorchProcessEngine,
) -> None:
    before = child.tokens_generated
    received = await leave_after(
        child, GenerationRequest(prompt="The", max_tokens=200, temperature=0), 3
    )
    # Counted as the child sends them: the cancel was answered within one token (the
    # child may have had one in flight), and nothing more came after it.
    assert received <= child.tokens_generated - before <= received + 1


async def test_a_cancelled_consumer_task_stops_the_child(child: TorchProcessEngine) -> None:
    before = child.tokens_generated
    await cancel_after_first(child, GenerationRequest(prompt="The", max_tokens=200, temperature=0))
    # The next request is served at once: the cancelled one no longer decodes.
    assert text_of(await collect(child, SAME["greedy"])).startswith(" is fast.")
    assert child.tokens_generated - before < 200 + 40


async def test_the_clients_mistakes_cross_the_pipe_as_themselves(
    child: TorchProcessEngine,
) -> None:
    with pytest.raises(InvalidRequestError, match="context is 256 tokens") as too_long:
        await collect(child, GenerationRequest(prompt="word " * 400, max_tokens=4))
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as bad_bias:
        await collect(
            child, GenerationRequest(prompt="The", max_tokens=2, logit_bias=((10**6, 1.0),))
        )
    assert bad_bias.value.param == "logit_bias"
    assert child.loaded and child.processes_started == 1  # the child lives on


async def test_sigint_and_sigterm_do_not_stop_a_stream(child: TorchProcessEngine) -> None:
    # Ctrl-C and a service manager's SIGTERM reach the whole process group; the child
    # waits for the server to drain and close the pipe.
    pid = child.pid
    assert pid is not None
    chunks: list[GenerationChunk] = []
    async for chunk in child.generate(SAME["greedy"]):
        chunks.append(chunk)
        if len(chunks) == 2:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
    assert tokens_of(chunks) == 40 and chunks[-1].finish_reason == "length"
    assert child.pid == pid


async def test_sigkill_mid_stream_fails_over_a_probe_restarts_and_a_crash_is_explained(
    inline: TorchEngine,
) -> None:
    clock = VirtualClock()
    primary = TorchProcessEngine(DEMO_MODEL_DIR, name="gpu", threads=1)
    breaker = CircuitBreaker("gpu", clock=clock, failure_threshold=1, open_duration=OPEN)
    manager = RuntimeManager(primary, inline, clock=clock, primary_breaker=breaker)
    await manager.start()
    try:
        request = GenerationRequest(prompt="The GPU", max_tokens=120, temperature=0)
        reference = text_of(await collect(inline, request))
        first_pid = primary.pid
        assert first_pid is not None
        chunks: list[GenerationChunk] = []
        async for chunk in manager.generate(request):
            chunks.append(chunk)
            if len(chunks) == 5:
                os.kill(first_pid, signal.SIGKILL)
        assert text_of(chunks) == reference
        assert token_indices(chunks) == list(range(tokens_of(chunks)))
        engines = [c.engine for c in chunks]
        switch = engines.index("cpu")
        assert switch >= 5 and set(engines[switch:]) == {"cpu"}
        assert manager.metrics().continued_mid_stream == 1
        assert manager.primary_breaker.state is BreakerState.OPEN

        await clock.advance(OPEN)  # one probe goes to the primary: a new process
        probe = await collect(manager, GenerationRequest(prompt="The", max_tokens=4))
        assert {c.engine for c in probe} == {"gpu"}
        second_pid = primary.pid
        assert second_pid not in (None, first_pid)
        assert primary.processes_started == 2

        # Asked directly, the engine says how its process died.
        os.kill(second_pid, signal.SIGKILL)
        died = r"torch process \(pid \d+\) died \(killed by SIGKILL\)"
        with pytest.raises(EngineCrashedError, match=died) as crash:
            await collect(primary, GenerationRequest(prompt="The", max_tokens=50))
        # Killed before the request was sent, or while it ran: a crash either way.
        assert crash.value.exit_code in (None, -signal.SIGKILL)
    finally:
        await manager.close()
        await inline.load()  # the manager closed the module's in-process engine


async def test_what_the_server_can_tell_is_said_without_starting_a_process(
    tmp_path: Path,
) -> None:
    missing = TorchProcessEngine(tmp_path / "nowhere")
    with pytest.raises(EngineUnavailableError, match=r"config\.json is missing"):
        await missing.load()
    assert missing.processes_started == 0
    if NO_GPU_NODES:
        gpu = TorchProcessEngine(DEMO_MODEL_DIR, device="cuda")
        with pytest.raises(EngineUnavailableError, match="no GPU device") as no_gpu:
            await gpu.load()
        assert no_gpu.value.permanent and gpu.processes_started == 0


async def test_corrupt_weights_are_refused_by_the_child_and_it_is_reaped(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    engine = TorchProcessEngine(folder, threads=1)
    with pytest.raises(EngineUnavailableError, match=r"cannot load .*model"):
        await engine.load()
    assert engine.processes_started == 1 and not engine.loaded and engine.pid is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
async def test_a_cuda_child_streams_the_cpu_text_and_a_sigkill_frees_the_device(
    child: TorchProcessEngine,
) -> None:
    gpu = TorchProcessEngine(DEMO_MODEL_DIR, device="cuda", dtype="float32", name="gpu")
    async with loaded(gpu):
        request = GenerationRequest(prompt="The GPU", max_tokens=16, temperature=0)
        assert text_of(await collect(gpu, request)) == text_of(await collect(child, request))
        assert gpu.dtype_name == "float32"
        pid = gpu.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the CUDA context goes with the process
        with pytest.raises(EngineCrashedError):
            await collect(gpu, request)
        assert text_of(await collect(gpu, request)) == text_of(await collect(child, request))
        assert gpu.processes_started == 2


_SERVER = """
import asyncio, sys
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.torch_process import TorchProcessEngine

async def main():
    engine = TorchProcessEngine(sys.argv[1], threads=1)
    await engine.load()
    stream = engine.generate(GenerationRequest(prompt="The", max_tokens=250, temperature=0))
    await anext(stream)  # a request is under way in the child (it waits for credit soon)
    print(engine.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_the_child_exits_when_the_server_is_killed_mid_request() -> None:
    await child_exits_with_its_server(_SERVER, str(DEMO_MODEL_DIR))
