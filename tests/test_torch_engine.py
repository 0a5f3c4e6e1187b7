"""TorchEngine on the embedded demo model: real transformers inference on the CPU."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _chunk_support import (
    cancel_after_first,
    collect,
    leave_after,
    text_of,
    token_indices,
    tokens_of,
)
from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import EngineUnavailableError, InvalidRequestError
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.torch_engine import IncrementalDetokenizer, StopMatcher, TorchEngine
from kensho.runtime.manager import RuntimeManager

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def engine() -> Iterator[TorchEngine]:
    eng = TorchEngine(DEMO_MODEL_DIR, device="cpu")
    asyncio.run(eng.load())
    yield eng
    asyncio.run(eng.close())


def reference_greedy(prompt: str, max_new_tokens: int) -> str:
    """What plain transformers ``generate()`` produces for the same prompt."""
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, local_files_only=True).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return str(tok.decode(out[0][ids.shape[1] :], skip_special_tokens=True))


async def test_greedy_stream_matches_plain_generate(engine: TorchEngine) -> None:
    chunks = await collect(
        engine, GenerationRequest(prompt="The GPU", max_tokens=24, temperature=0)
    )
    assert text_of(chunks) == reference_greedy("The GPU", 24)
    assert text_of(chunks).startswith(" is fast.")


async def test_streams_every_token_once_with_its_index(engine: TorchEngine) -> None:
    chunks = await collect(
        engine, GenerationRequest(prompt="The CPU", max_tokens=12, temperature=0)
    )
    assert token_indices(chunks) == list(range(12))
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c.engine == "cpu" for c in chunks)


async def test_max_tokens_is_honoured(engine: TorchEngine) -> None:
    chunks = await collect(engine, GenerationRequest(prompt="The", max_tokens=3, temperature=0))
    assert tokens_of(chunks) == 3
    assert chunks[-1].finish_reason == "length"


async def test_stop_string_ends_the_stream_and_is_not_emitted(engine: TorchEngine) -> None:
    full = text_of(
        await collect(engine, GenerationRequest(prompt="The GPU", max_tokens=24, temperature=0))
    )
    assert "CPU" in full
    chunks = await collect(
        engine, GenerationRequest(prompt="The GPU", max_tokens=24, temperature=0, stop=("CPU",))
    )
    assert text_of(chunks) == full[: full.index("CPU")]
    assert chunks[-1].finish_reason == "stop"


async def test_end_of_sequence_finishes_with_stop(engine: TorchEngine) -> None:
    request = GenerationRequest.chat(
        [("user", "Where did they eat?")], max_tokens=60, temperature=0
    )
    chunks = await collect(engine, request)
    assert text_of(chunks) == " In the café by the river. They had crème brûlée."
    assert chunks[-1].finish_reason == "stop"
    assert tokens_of(chunks) < 60


async def test_multibyte_characters_are_never_split(engine: TorchEngine) -> None:
    request = GenerationRequest.chat(
        [("user", "Where did they eat?")], max_tokens=60, temperature=0
    )
    chunks = await collect(engine, request)
    assert all("\ufffd" not in c.text for c in chunks)
    assert "crème brûlée" in text_of(chunks)


def test_incremental_detokenizer_holds_partial_utf8() -> None:
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    text = "crème brûlée, naïve café — ✓"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok.decode)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some character really did span several tokens


def test_stop_matcher_holds_back_a_partial_stop() -> None:
    matcher = StopMatcher(("</s>", "STOP"))
    assert matcher.feed("hello <") == ("hello ", False)
    assert matcher.feed("/") == ("", False)
    assert matcher.feed("x") == ("</x", False)
    assert matcher.feed(" ST") == (" ", False)
    assert matcher.feed("OP and more") == ("", True)
    assert StopMatcher(("ab",)).feed("xa") == ("x", False)
    tail = StopMatcher(("ab",))
    tail.feed("xa")
    assert tail.flush() == "a"


async def test_same_seed_same_text_and_other_seed_other_text(engine: TorchEngine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt="The", max_tokens=40, temperature=1.5, seed=seed)

    first = text_of(await collect(engine, sampled(7)))
    again = text_of(await collect(engine, sampled(7)))
    other = text_of(await collect(engine, sampled(8)))
    assert first == again
    assert first != other


async def test_top_p_restricts_sampling_to_the_nucleus(engine: TorchEngine) -> None:
    # With a tiny nucleus only the most likely token survives: sampling equals greedy.
    greedy = text_of(
        await collect(engine, GenerationRequest(prompt="The GPU", max_tokens=16, temperature=0))
    )
    nucleus = text_of(
        await collect(
            engine,
            GenerationRequest(prompt="The GPU", max_tokens=16, temperature=1.0, top_p=1e-6, seed=1),
        )
    )
    assert nucleus == greedy


async def test_continuation_carries_on_where_another_engine_stopped(engine: TorchEngine) -> None:
    request = GenerationRequest(prompt="The GPU", max_tokens=20, temperature=0)
    full = await collect(engine, request)
    head = full[:6]
    rest = await collect(engine, request.continued(text_of(head), len(head)))
    assert text_of(head) + text_of(rest) == text_of(full)
    assert rest[0].index == 6
    assert rest[-1].finish_reason == "length"


async def test_chat_uses_the_tokenizer_template(engine: TorchEngine) -> None:
    request = GenerationRequest.chat([("user", "What is Kensho?")], max_tokens=8, temperature=0)
    assert engine.prompt_text(request) == "User: What is Kensho?\nAssistant:"
    assert text_of(await collect(engine, request)).startswith(" Kensho is a runtime")


async def test_consumer_that_stops_reading_stops_generation_within_one_token(
    engine: TorchEngine,
) -> None:
    before = engine.tokens_generated
    received = await leave_after(
        engine, GenerationRequest(prompt="The", max_tokens=200, temperature=0), 3
    )
    generated = engine.tokens_generated - before
    assert received <= generated <= received + 1


async def test_cancelling_the_consumer_task_stops_generation(engine: TorchEngine) -> None:
    before = engine.tokens_generated
    await cancel_after_first(engine, GenerationRequest(prompt="The", max_tokens=200, temperature=0))
    assert engine.tokens_generated - before < 200


async def test_prompt_longer_than_the_context_is_a_clear_error(engine: TorchEngine) -> None:
    with pytest.raises(ValueError, match="context"):
        await collect(engine, GenerationRequest(prompt="word " * 400, max_tokens=4))


async def test_generate_before_load_is_refused() -> None:
    eng = TorchEngine(DEMO_MODEL_DIR)
    with pytest.raises(EngineUnavailableError, match="not loaded"):
        await collect(eng, GenerationRequest(prompt="x"))


async def test_missing_model_folder_is_unavailable(tmp_path: Path) -> None:
    eng = TorchEngine(tmp_path / "nowhere")
    with pytest.raises(EngineUnavailableError, match=r"config\.json is missing"):
        await eng.load()
    assert not eng.loaded


async def test_corrupt_weights_are_refused_at_load(tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 100)
    eng = TorchEngine(broken)
    with pytest.raises(EngineUnavailableError, match="cannot load"):
        await eng.load()


def test_invalid_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        TorchEngine(DEMO_MODEL_DIR, dtype="int3")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA; the no-GPU path cannot be shown")
async def test_gpu_engine_without_cuda_reports_unavailable_at_load() -> None:
    eng = TorchEngine(DEMO_MODEL_DIR, device="cuda", name="gpu")
    assert eng.kind == "gpu"
    with pytest.raises(EngineUnavailableError, match="no CUDA device"):
        await eng.load()
    assert not eng.loaded


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")
async def test_cuda_greedy_stream_matches_cpu() -> None:
    gpu = TorchEngine(DEMO_MODEL_DIR, device="cuda", dtype="float32", name="gpu")
    await gpu.load()
    try:
        request = GenerationRequest(prompt="The GPU", max_tokens=16, temperature=0)
        chunks = await collect(gpu, request)
        assert text_of(chunks) == reference_greedy("The GPU", 16)
        assert all(c.engine == "gpu" for c in chunks)
    finally:
        await gpu.close()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")
async def test_cuda_default_dtype_is_half_precision() -> None:
    gpu = TorchEngine(DEMO_MODEL_DIR, device="cuda", name="gpu")
    await gpu.load()
    try:
        assert gpu.dtype_name in {"bfloat16", "float16"}
        chunks = await collect(gpu, GenerationRequest(prompt="The", max_tokens=8, temperature=0))
        assert tokens_of(chunks) == 8
    finally:
        await gpu.close()


def _model_copy(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, target)
    return target


async def test_chat_the_template_refuses_is_the_clients_error(tmp_path: Path) -> None:
    folder = _model_copy(tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    )
    primary, fallback = TorchEngine(folder, name="gpu-weights"), TorchEngine(folder)
    manager = RuntimeManager(primary, fallback)
    await manager.start()
    try:
        request = GenerationRequest.chat([("system", "be brief"), ("user", "hi")], max_tokens=4)
        for _ in range(4):
            with pytest.raises(InvalidRequestError, match="System role not supported"):
                [c async for c in manager.generate(request)]
        assert str(manager.primary_breaker.state) == "closed"
        assert manager.fallback_breaker is not None
        assert str(manager.fallback_breaker.state) == "closed"
        ok = GenerationRequest.chat([("developer", "be brief")], max_tokens=4)
        with pytest.raises(InvalidRequestError):  # developer maps to system: refused too
            [c async for c in manager.generate(ok)]
    finally:
        await manager.close()


async def test_generation_config_end_tokens_stop_the_stream(tmp_path: Path) -> None:
    folder = _model_copy(tmp_path)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, newline[0]]  # like Llama 3's <|eot_id|>
    (folder / "generation_config.json").write_text(json.dumps(config))
    eng = TorchEngine(folder)
    await eng.load()
    try:
        chunks = await collect(
            eng, GenerationRequest(prompt="The GPU", max_tokens=40, temperature=0)
        )
    finally:
        await eng.close()
    assert text_of(chunks) == " is fast. The CPU is slower, but it is always there."
    assert chunks[-1].finish_reason == "stop"


async def test_a_cancelled_load_still_leaves_a_usable_engine() -> None:
    eng = TorchEngine(DEMO_MODEL_DIR)
    first = asyncio.create_task(eng.load())
    await asyncio.sleep(0)  # let the load start, then cancel its caller (a probe timeout)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await eng.load()  # joins the load already under way instead of starting another
    try:
        assert eng.loaded
        chunks = await collect(eng, GenerationRequest(prompt="The", max_tokens=3, temperature=0))
        assert tokens_of(chunks) == 3
    finally:
        await eng.close()
    assert not eng.loaded


_TWO_AT_ONCE = """
import asyncio, sys
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.manager import RuntimeManager

async def main():
    gpu = TorchEngine(sys.argv[1], device="cuda", name="gpu")  # fails at once without CUDA
    manager = RuntimeManager(gpu, TorchEngine(sys.argv[1], name="cpu"))
    await manager.start()  # loads both at once, in a process that never imported torch
    print(gpu.loaded, manager.fallback_breaker.state.value, flush=True)
    await manager.close()

asyncio.run(main())
"""


def test_two_engines_load_at_once_in_a_fresh_process() -> None:
    # transformers' lazy first import and from_pretrained are not thread-safe: the
    # runtime's concurrent loads must still both succeed.
    done = subprocess.run(
        [sys.executable, "-c", _TWO_AT_ONCE, str(DEMO_MODEL_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The CPU engine loaded (its breaker closed), and the GPU one did where CUDA exists.
    assert done.stdout.split() == [str(HAS_CUDA), "closed"]
