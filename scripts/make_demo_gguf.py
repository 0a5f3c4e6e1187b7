"""Write Kensho's embedded demo model as GGUF files for the llama.cpp engine.

llama.cpp's own converter (``convert_hf_to_gguf.py``) refuses the demo's tokenizer (it
identifies pre-tokenizers by hashing their output on a fixed text, and the demo's is
not in its table), so this script writes the file directly with the ``gguf`` package's
writer: the Llama hyper-parameters, the byte-level BPE vocabulary and merges (as
llama.cpp's ``gpt2`` tokenizer with the ``gpt-2`` pre-tokenizer, whose regex is the one
the demo's ``ByteLevel`` uses), the chat template, and the weights, with the q/k rows permuted
from Hugging Face's rotary layout back to the interleaved one llama.cpp expects (the
same permutation as ``convert_hf_to_gguf.py``).

Two files are written beside the transformers folder: ``model.gguf`` (F32, the same
numbers as ``model.safetensors``, so greedy text equals the torch engine's) and
``model-q8_0.gguf`` (Q8_0 matrices, for a smaller and faster CPU fallback). The output
is a pure function of the input folder: no timestamps, tensors and keys in a fixed
order, so two runs give byte-identical files (the demo's manifest pins their hashes).

    .venv/bin/python scripts/make_demo_gguf.py [--model DIR] [--out DIR]

Then refresh the manifest: ``.venv/bin/python scripts/make_demo_model.py --manifest-only``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

__all__ = ["GGUF_FILES", "main", "write_gguf"]

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "src" / "kensho" / "demo" / "model"

#: file name -> quantization of the 2-D weight matrices (norms always stay F32).
GGUF_FILES: dict[str, gguf.GGMLQuantizationType] = {
    "model.gguf": gguf.GGMLQuantizationType.F32,
    "model-q8_0.gguf": gguf.GGMLQuantizationType.Q8_0,
}
_FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
# Hugging Face tensor name suffix -> GGUF name suffix inside a block.
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's "rotate half" q/k row order -> llama.cpp's interleaved pairs (per head)."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensors(model_dir: Path, config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """The weights in llama.cpp's names and layout, in a fixed order."""
    state = load_file(str(model_dir / "model.safetensors"))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in _BLOCK_TENSORS.items():
            data = state[f"model.layers.{layer}.{hf_name}"]
            if hf_name == "self_attn.q_proj.weight":
                data = permute_rotary(data, n_head)
            elif hf_name == "self_attn.k_proj.weight":
                data = permute_rotary(data, n_kv)
            out.append((f"blk.{layer}.{gguf_name}", data))
    out.append(("output_norm.weight", state["model.norm.weight"]))
    if not config.get("tie_word_embeddings", False):
        out.append(("output.weight", state["lm_head.weight"]))
    return [(name, np.ascontiguousarray(data, dtype=np.float32)) for name, data in out]


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict[str, Any]) -> None:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    special = {t["id"] for t in tokenizer["added_tokens"] if t.get("special")}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError(f"{model_dir}: the vocabulary ids are not 0..{len(tokens) - 1}")
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    merges = [" ".join(pair) for pair in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(int(config["eos_token_id"]))
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(int(config["pad_token_id"]))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template((model_dir / "chat_template.jinja").read_text(encoding="utf-8"))


def write_gguf(model_dir: Path, target: Path, quant: gguf.GGMLQuantizationType) -> None:
    """Write the transformers folder ``model_dir`` as one GGUF file at ``target``."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ValueError(f"{model_dir}: only llama models are written, not {config['model_type']}")
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    tmp = target.with_name(target.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name("kensho-demo")
    writer.add_file_type(_FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, model_dir, config)
    for name, data in _tensors(model_dir, config):
        if data.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: --model)")
    args = parser.parse_args(argv)
    out: Path = args.out or args.model
    out.mkdir(parents=True, exist_ok=True)
    for name, quant in GGUF_FILES.items():
        write_gguf(args.model, out / name, quant)
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
