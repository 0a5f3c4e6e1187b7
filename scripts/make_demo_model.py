"""Build Kensho's embedded demo model: a tiny Llama-style causal LM and its tokenizer.

The model is trained for a few seconds on ``scripts/demo_corpus.txt`` (text written for
this project), so its output is recognisable English, not noise. Everything is seeded
and single-threaded, so a run on the same machine reproduces the same files. The result
is written in the standard transformers folder format (``config.json``,
``model.safetensors``, ``tokenizer.json``, ...) to ``src/kensho/demo/model``, and its
manifest to ``src/kensho/demo/manifest.json`` (the store ``kensho up`` fills from it).

    .venv/bin/python scripts/make_demo_model.py [--steps 900] [--out DIR] [--manifest-only]
"""

from __future__ import annotations

import argparse
import asyncio
import random
from datetime import UTC, datetime
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kensho.storage import build_manifest, dump_manifest

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "demo_corpus.txt"
DEFAULT_OUT = HERE.parent / "src" / "kensho" / "demo" / "model"
DEMO_CHUNK_SIZE = 256 * 1024  # small chunks, so repairing a flipped byte fetches little
DEMO_CREATED = datetime(2026, 11, 25, tzinfo=UTC)  # fixed: the manifest is reproducible
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Tools are named in one line: the demo's context is 256 tokens, which full JSON schemas
# would fill, and the grammar (not the tiny model) keeps the arguments valid. Calls
# render in the form kensho.runtime.engines.structured defines, as Hermes/Qwen-style
# templates do; a chat without tools renders exactly as it always did.
TOOLS_PREAMBLE = (
    "{% if tools %}Tools: "
    "{% for tool in tools %}{{ tool['function']['name'] }}{{ ', ' if not loop.last else '' }}"
    "{% endfor %}{{ '\\n' }}{% endif %}"
)
TOOL_CALLS = (
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '\\n' if not loop.first else '' }}"  # a literal newline after a tag is trimmed
    "<tool_call>\n{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}\n</tool_call>"
    "{% endfor %}"
)
CHAT_TEMPLATE = (
    TOOLS_PREAMBLE + "{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}"
    + TOOL_CALLS
    + EOS
    + "\n{% elif message['role'] == 'tool' %}Tool: {{ message['content'] }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any UTF-8 input encodes, and multi-byte characters may span tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None, unk_token=None
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.model_max_length = 256
    return wrapped


def training_stream(text: str, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The corpus as one token stream; an assistant answer ends with EOS, like chat."""
    ids: list[int] = []
    for line in text.splitlines():
        suffix = EOS + "\n" if line.startswith("Assistant:") else "\n"
        ids.extend(tokenizer.encode(line + suffix, add_special_tokens=False))
    return ids


def write_manifest(model_dir: Path, target: Path) -> None:
    """The demo store's manifest: every file of the model folder, required."""
    manifest = asyncio.run(
        build_manifest(
            model_dir,
            name="kensho-demo",
            version="1.0.0",
            serial=1,
            chunk_size=DEMO_CHUNK_SIZE,
            changelog="Tiny Llama-style demo model trained on scripts/demo_corpus.txt.",
            created=DEMO_CREATED,
        )
    )
    target.write_bytes(dump_manifest(manifest))
    print(f"wrote {target} ({len(manifest.files)} files)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--vocab-size", type=int, default=384)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--manifest-only", action="store_true")
    args = parser.parse_args()
    manifest_path = args.out.parent / "manifest.json"
    if args.manifest_only:
        write_manifest(args.out, manifest_path)
        return

    random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    text = CORPUS.read_text(encoding="utf-8")
    tokenizer = build_tokenizer(text, args.vocab_size)
    stream = torch.tensor(training_stream(text, tokenizer), dtype=torch.long)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    window, batch = 96, 24
    model.train()
    loss = torch.tensor(0.0)
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - window - 1, (batch,))
        x = torch.stack([stream[s : s + window] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"final loss {loss.item():.3f}")

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    for prompt in ["The GPU", "User: What is Kensho?\nAssistant:"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=30, do_sample=False)
        print(repr(tokenizer.decode(out[0], skip_special_tokens=True)))
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1024:.0f} KiB)")
    write_manifest(args.out, manifest_path)


if __name__ == "__main__":
    main()
