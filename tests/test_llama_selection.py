"""Choosing llama.cpp engines: settings, environment, files of the store, mixed pairs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from _chunk_support import tokens_of
from kensho.config import ModelSettings, Settings, StorageSettings, load_settings
from kensho.errors import ConfigError
from kensho.kernel import Kernel
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.llama_engine import LlamaCppEngine
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.engines.torch_process import TorchProcessEngine


def settings(root: Path, **model: object) -> Settings:
    return Settings(
        storage=StorageSettings(root=root),
        model=ModelSettings(**model),  # type: ignore[arg-type]
    )


def test_the_environment_selects_engines_and_files(tmp_path: Path) -> None:
    env = {
        "KENSHO_MODEL_ENGINE": "llama",
        "KENSHO_MODEL_FALLBACK_GGUF": "model-q8_0.gguf",
        "KENSHO_MODEL_FALLBACK_ENGINE": "llama",
    }
    model = load_settings(env=env, cwd=tmp_path).model
    assert (model.engine, model.fallback_engine) == ("llama", "llama")
    assert (model.gguf, model.fallback_gguf) == ("model.gguf", "model-q8_0.gguf")
    with pytest.raises(ConfigError, match="KENSHO_MODEL_ENGINE"):
        load_settings(env={"KENSHO_MODEL_ENGINE": "ollama"}, cwd=tmp_path)


def test_each_engine_gets_its_file_of_the_store(tmp_path: Path) -> None:
    kernel = Kernel(settings(tmp_path, engine="llama", fallback_gguf="model-q8_0.gguf"))
    primary, fallback = kernel._make_engines()
    root = kernel.storage.root.resolve()
    assert isinstance(primary, LlamaCppEngine) and isinstance(fallback, LlamaCppEngine)
    assert (primary.model_path, primary.kind) == (root / "model.gguf", "gpu")
    assert (fallback.model_path, fallback.kind) == (root / "model-q8_0.gguf", "cpu")


def test_a_mixed_pair_torch_primary_llama_fallback(tmp_path: Path) -> None:
    kernel = Kernel(settings(tmp_path, engine="torch", fallback_engine="llama"))
    primary, fallback = kernel._make_engines()
    assert isinstance(primary, TorchProcessEngine) and primary.kind == "gpu"
    assert isinstance(fallback, LlamaCppEngine) and fallback.kind == "cpu"
    assert fallback.model_path == kernel.storage.root.resolve() / "model.gguf"


def test_torch_engines_run_in_child_processes_unless_isolate_is_off(tmp_path: Path) -> None:
    isolated = Kernel(settings(tmp_path, engine="torch"))._make_engines()
    assert all(isinstance(engine, TorchProcessEngine) for engine in isolated)
    inline = Kernel(settings(tmp_path, engine="torch", isolate=False))._make_engines()
    assert all(isinstance(engine, TorchEngine) for engine in inline)
    assert [engine.kind for engine in inline] == ["gpu", "cpu"]


@pytest.mark.parametrize("name", ["../elsewhere.gguf", "/etc/passwd", "."])
def test_a_file_outside_the_store_is_a_config_error(tmp_path: Path, name: str) -> None:
    kernel = Kernel(settings(tmp_path, engine="llama", gguf=name))
    with pytest.raises(ConfigError, match=r"model\.gguf = .* is not a file inside the store"):
        kernel._make_engines()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="no llama-cpp-python")
async def test_demo_boot_on_llama_verifies_the_gguf_files_and_serves(tmp_path: Path) -> None:
    kernel = Kernel(settings(tmp_path, engine="llama", fallback_gguf="model-q8_0.gguf"))
    try:
        await kernel.boot()
        runtime = kernel.runtime
        assert runtime is not None
        report = kernel.storage.report
        assert report is not None
        assert {f.path for f in report.files} >= {"model.gguf", "model-q8_0.gguf"}
        request = GenerationRequest(prompt="The GPU", max_tokens=6, temperature=0)
        chunks = [c async for c in runtime.generate(request)]
        assert tokens_of(chunks) == 6 and {c.engine for c in chunks} == {runtime.active_engine.name}
    finally:
        await kernel.shutdown()
