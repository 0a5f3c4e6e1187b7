"""scripts/make_demo_gguf.py: the demo model as GGUF, reproducibly, and shipped as such."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from kensho.demo import DEMO_MANIFEST, DEMO_MODEL_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_gguf.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_gguf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_runs_write_byte_identical_files_equal_to_the_shipped_ones(
    script: ModuleType, tmp_path: Path
) -> None:
    script.main(["--model", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "a")])
    script.main(["--model", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "b")])
    for name in script.GGUF_FILES:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), name
        assert first == (DEMO_MODEL_DIR / name).read_bytes(), f"{name} is stale: rerun the script"
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_the_demo_manifest_covers_both_gguf_files() -> None:
    files = {f["path"]: f for f in json.loads(DEMO_MANIFEST.read_text())["signed"]["files"]}
    for name in ("model.gguf", "model-q8_0.gguf"):
        entry = files[name]
        assert entry["required"] is True
        assert entry["size"] == (DEMO_MODEL_DIR / name).stat().st_size
        assert entry["sha256"] == hashlib.sha256((DEMO_MODEL_DIR / name).read_bytes()).hexdigest()


def test_header_tokenizer_and_permuted_weights() -> None:
    reader = gguf.GGUFReader(DEMO_MODEL_DIR / "model.gguf")

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.context_length") == 256
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.chat_template") == (DEMO_MODEL_DIR / "chat_template.jinja").read_text()
    tokens = field("tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and tokens[:2] == ["<|endoftext|>", "<|pad|>"]
    assert field("tokenizer.ggml.token_type")[:3] == [3, 3, 1]  # type: ignore[index]
    state = load_file(str(DEMO_MODEL_DIR / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(hf_q.shape)
    # Head 0, first rotary pair: HF keeps halves apart (rows 0 and 12), GGUF interleaves.
    assert np.array_equal(q[0], hf_q[0]) and np.array_equal(q[1], hf_q[12])
    assert np.array_equal(
        np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(96, 256),
        state["model.layers.1.mlp.down_proj.weight"],
    )


def test_q8_0_file_is_quantized_and_smaller() -> None:
    reader = gguf.GGUFReader(DEMO_MODEL_DIR / "model-q8_0.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    size_q8 = (DEMO_MODEL_DIR / "model-q8_0.gguf").stat().st_size
    assert size_q8 < (DEMO_MODEL_DIR / "model.gguf").stat().st_size / 3
