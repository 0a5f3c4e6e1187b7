"""LlamaCppEngine on the demo GGUF: the real llama.cpp library, in a real child process."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import gguf
import pytest
import pytest_asyncio

from _chunk_support import collect, loaded, text_of, token_indices, tokens_of
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import (
    EngineCrashedError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelFileError,
)
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.llama_engine import WINDOW, LlamaCppEngine
from kensho.runtime.engines.torch_engine import TorchEngine

# Not imported here: importing llama_cpp leaks a /dev/null handle (a ResourceWarning);
# the engines import it in their own processes.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (extra `llama`)", allow_module_level=True)

pytestmark = pytest.mark.asyncio(loop_scope="module")

GGUF = DEMO_MODEL_DIR / "model.gguf"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_gguf.py"


def _gguf_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_gguf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GGUF_Q8 = DEMO_MODEL_DIR / "model-q8_0.gguf"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    async with loaded(LlamaCppEngine(GGUF, n_threads=1)) as eng:
        yield eng


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def torch_engine() -> AsyncIterator[TorchEngine]:
    async with loaded(TorchEngine(DEMO_MODEL_DIR, name="torch")) as eng:
        yield eng


@pytest.mark.parametrize("prompt", ["The GPU", "Kensho is", "The café"])
async def test_greedy_text_equals_the_torch_engine_on_the_f32_file(
    engine: LlamaCppEngine, torch_engine: TorchEngine, prompt: str
) -> None:
    request = GenerationRequest(prompt=prompt, max_tokens=40, temperature=0)
    llama = await collect(engine, request)
    torch = await collect(torch_engine, request)
    assert text_of(llama) == text_of(torch)
    assert token_indices(llama) == token_indices(torch)
    assert llama[-1].finish_reason == torch[-1].finish_reason


async def test_chat_uses_the_gguf_template_like_transformers(
    engine: LlamaCppEngine, torch_engine: TorchEngine
) -> None:
    request = GenerationRequest.chat(
        [("user", "Where did they eat?")], max_tokens=40, temperature=0
    )
    llama = await collect(engine, request)
    assert text_of(llama) == text_of(await collect(torch_engine, request))
    assert text_of(llama) == " In the café by the river. They had crème brûlée."
    assert llama[-1].finish_reason == "stop"  # the template's <|endoftext|> ends the turn


async def test_streams_every_token_once_with_its_index(engine: LlamaCppEngine) -> None:
    chunks = await collect(
        engine, GenerationRequest(prompt="The CPU", max_tokens=12, temperature=0)
    )
    assert token_indices(chunks) == list(range(12))
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert {c.engine for c in chunks} == {"cpu"}


async def test_stop_string_ends_the_stream_and_is_never_emitted(engine: LlamaCppEngine) -> None:
    full = text_of(
        await collect(engine, GenerationRequest(prompt="The GPU", max_tokens=24, temperature=0))
    )
    assert "CPU" in full
    chunks = await collect(
        engine, GenerationRequest(prompt="The GPU", max_tokens=24, temperature=0, stop=("CPU",))
    )
    assert text_of(chunks) == full[: full.index("CPU")]
    assert chunks[-1].finish_reason == "stop"


async def test_seeded_sampling_is_reproducible(engine: LlamaCppEngine) -> None:
    def req(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt="The", max_tokens=30, temperature=1.0, top_p=0.9, seed=seed)

    first = text_of(await collect(engine, req(7)))
    assert text_of(await collect(engine, req(7))) == first
    others = {text_of(await collect(engine, req(seed))) for seed in (8, 9, 10)}
    assert others - {first}  # another seed draws other tokens


async def test_continuation_is_identical_to_an_uninterrupted_run(engine: LlamaCppEngine) -> None:
    # Cut after exactly 11 tokens, whatever the chunking (a consumer that fell behind
    # gets merged chunks): each token's bytes come with its logprob entry.
    request = GenerationRequest(prompt="The GPU", max_tokens=30, temperature=0, logprobs=True)
    whole = await collect(engine, request)
    head = b"".join([e.token_bytes for c in whole for e in c.logprobs][:11]).decode()
    rest = await collect(engine, request.continued(head, 11))
    assert head + text_of(rest) == text_of(whole)
    assert token_indices(rest) == token_indices(whole)[11:]


async def test_a_departed_consumer_stops_the_child_within_its_window(
    engine: LlamaCppEngine,
) -> None:
    before = engine.tokens_generated
    stream = engine.generate(GenerationRequest(prompt="The", max_tokens=200, temperature=0))
    async for _ in stream:
        break
    await stream.aclose()  # returns once the child has acknowledged the cancellation
    decoded = engine.tokens_generated - before
    assert decoded <= 1 + WINDOW + 1
    chunks = await collect(engine, GenerationRequest(prompt="The", max_tokens=3, temperature=0))
    assert tokens_of(chunks) == 3  # the child is free for the next request


async def test_a_cancelled_prompt_is_aborted_during_its_prefill(engine: LlamaCppEngine) -> None:
    reference = await collect(
        engine, GenerationRequest(prompt="The GPU", max_tokens=20, temperature=0)
    )
    aborted = engine.prefills_aborted
    busy = engine.generate(GenerationRequest(prompt="The", max_tokens=200, temperature=0))
    await anext(busy)  # the child now serves this one, and waits for credit after WINDOW
    queued = asyncio.create_task(
        collect(engine, GenerationRequest(prompt="word " * 60, max_tokens=5, temperature=0))
    )
    await asyncio.sleep(0)  # let it send its request (queued behind the busy one)
    queued.cancel()
    async for _ in busy:  # the busy request finishes; the queued one starts, cancelled
        pass
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert engine.prefills_aborted == aborted + 1  # llama_decode stopped by the callback
    again = await collect(engine, GenerationRequest(prompt="The GPU", max_tokens=20, temperature=0))
    assert text_of(again) == text_of(reference)  # the KV cache was left consistent


async def test_prompt_longer_than_the_context_is_a_client_error(engine: LlamaCppEngine) -> None:
    with pytest.raises(InvalidRequestError, match="context") as info:
        await collect(engine, GenerationRequest(prompt="word " * 400, max_tokens=4))
    assert info.value.code == "context_length_exceeded"
    assert tokens_of(await collect(engine, GenerationRequest(prompt="The", max_tokens=2))) == 2


async def test_a_chat_the_template_refuses_is_a_client_error(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.gguf"))
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    template = folder / "chat_template.jinja"
    template.write_text(strict + template.read_text())
    _gguf_script().write_gguf(folder, folder / "strict.gguf", gguf.GGMLQuantizationType.F32)
    eng = LlamaCppEngine(folder / "strict.gguf", n_threads=1)
    await eng.load()
    try:
        with pytest.raises(InvalidRequestError, match=r"template refused.*user first"):
            await collect(eng, GenerationRequest.chat([("assistant", "hi")], max_tokens=4))
        ok = GenerationRequest.chat([("user", "Where did they eat?")], max_tokens=4)
        assert tokens_of(await collect(eng, ok)) == 4
    finally:
        await eng.close()


async def test_sigkill_of_the_child_is_a_crash_and_the_next_call_starts_a_new_one() -> None:
    eng = LlamaCppEngine(GGUF, n_threads=1)
    await eng.load()
    try:
        first_pid = eng.pid
        assert first_pid is not None
        stream = eng.generate(GenerationRequest(prompt="The", max_tokens=200, temperature=0))
        with pytest.raises(EngineCrashedError, match="SIGKILL") as info:
            async for _ in stream:
                os.kill(first_pid, signal.SIGKILL)
        assert info.value.exit_code == -signal.SIGKILL
        assert not await eng.health()
        chunks = await collect(
            eng, GenerationRequest(prompt="The GPU", max_tokens=5, temperature=0)
        )
        assert tokens_of(chunks) == 5
        assert eng.pid not in (None, first_pid)
        assert eng.processes_started == 2
    finally:
        await eng.close()
    assert eng.pid is None


async def test_file_that_is_not_gguf_is_refused_naming_it(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFileError, match=r"model\.gguf is not a GGUF file") as info:
        await LlamaCppEngine(bogus).load()
    assert info.value.path == bogus


async def test_corrupted_gguf_is_refused_until_repaired(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    data = GGUF.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut in half
    eng = LlamaCppEngine(path, n_threads=1)
    with pytest.raises(ModelFileError, match=str(path)):
        await eng.load()
    assert not eng.loaded
    shutil.copyfile(GGUF, path)  # the store repairs it
    await eng.load()
    try:
        assert tokens_of(await collect(eng, GenerationRequest(prompt="The", max_tokens=2))) == 2
    finally:
        await eng.close()


async def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "kensho-imaginary")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match="kensho-imaginary"):
        await LlamaCppEngine(path).load()


async def test_context_longer_than_the_models_is_refused(tmp_path: Path) -> None:
    del tmp_path
    with pytest.raises(ModelFileError, match="trained for 256"):
        await LlamaCppEngine(GGUF, n_ctx=4096).load()


async def test_missing_file_is_unavailable_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailableError, match="kensho verify"):
        await LlamaCppEngine(tmp_path / "nowhere.gguf").load()


async def test_generate_before_load_is_refused() -> None:
    with pytest.raises(EngineUnavailableError, match="not loaded"):
        await collect(LlamaCppEngine(GGUF), GenerationRequest(prompt="x"))


async def test_quantized_file_serves_too() -> None:
    eng = LlamaCppEngine(GGUF_Q8, n_threads=1)
    await eng.load()
    try:
        chunks = await collect(
            eng, GenerationRequest(prompt="The GPU", max_tokens=8, temperature=0)
        )
        assert tokens_of(chunks) == 8 and text_of(chunks).strip()
    finally:
        await eng.close()


async def test_gpu_engine_offloads_where_it_can_else_is_unavailable_for_good(
    engine: LlamaCppEngine,
) -> None:
    gpu = LlamaCppEngine(GGUF, device="cuda")
    try:
        await gpu.load()
    except EngineUnavailableError as exc:
        assert exc.permanent
        assert "without GPU support or sees no GPU device" in str(exc)
        pytest.skip("llama.cpp was built without GPU support or sees no GPU device")
    try:
        request = GenerationRequest(prompt="The GPU", max_tokens=16, temperature=0)
        assert text_of(await collect(gpu, request)) == text_of(await collect(engine, request))
    finally:
        await gpu.close()


async def test_concurrent_requests_are_served_in_turn(engine: LlamaCppEngine) -> None:
    requests = [
        GenerationRequest(prompt=p, max_tokens=10, temperature=0) for p in ("The", "A", "GPU")
    ]
    alone = [text_of(await collect(engine, r)) for r in requests]
    together = await asyncio.gather(*(collect(engine, r) for r in requests))
    assert [text_of(c) for c in together] == alone


async def test_a_stop_string_past_the_window_frees_the_child_for_the_next_request(
    engine: LlamaCppEngine,
) -> None:
    # The child is WINDOW tokens ahead when the parent sees the stop string: it must be
    # told to stop, or it waits for credit forever and the next request never starts.
    request = GenerationRequest(
        prompt="The GPU", max_tokens=4 * WINDOW, temperature=0, stop=("CPU",)
    )
    chunks = await collect(engine, request)
    assert chunks[-1].finish_reason == "stop"
    after = await collect(engine, GenerationRequest(prompt="The GPU", max_tokens=3, temperature=0))
    assert tokens_of(after) == 3


async def test_tokens_that_queued_while_the_consumer_was_away_come_as_one_chunk(
    engine: LlamaCppEngine,
) -> None:
    request = GenerationRequest(prompt="The GPU", max_tokens=20, temperature=0)
    reference = await collect(engine, request)
    before = engine.tokens_generated
    stream = engine.generate(request)
    first = await anext(stream)
    # The consumer is away while 10 more tokens arrive. sleep(0) sleeps no time: it
    # only yields to the pipe reader, whose own counter is the condition.
    while engine.tokens_generated < before + 11:  # noqa: ASYNC110
        await asyncio.sleep(0)
    behind = await anext(stream)
    rest = [first, behind] + [chunk async for chunk in stream]
    assert first.tokens + behind.tokens >= 11  # all that arrived meanwhile, in one chunk
    assert text_of(rest) == text_of(reference)
    assert token_indices(rest) == list(range(20))
