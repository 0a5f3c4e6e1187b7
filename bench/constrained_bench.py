"""Per-token cost of constrained decoding (llguidance) in the TorchEngine.

Decodes the same chat at temperature 1 over several seeds (speed from the first
token on, so the prompt's prefill does not count), as free text, as JSON that
must fit a schema (enums, bounds, nested object, array), and as a required tool call,
and reports decode speed (tokens/s, median over seeds) and its cost against free text.
"grammar alone" replays a schema answer's tokens through the grammar without the model:
the mask's own cost per token (compute, apply on the logits' device, advance), and
what it adds to a free-text token. Answers differ in length (free text ends on the
model's own end of turn), and a longer answer's later tokens attend to more context:
the last two rows step the model through one schema answer's tokens, the same tokens
at the same positions, without and with the grammar — the per-token cost proper.

    .venv/bin/python bench/constrained_bench.py [--model DIR] [--device cpu] [--seeds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _table import machine_line, markdown_table
from kensho.demo import DEMO_MODEL_DIR
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.structured import ResponseFormat, ToolSpec
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.telemetry import configure_logging

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
TOOL = ToolSpec(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
MODES: dict[str, dict[str, Any]] = {
    "free text": {},
    "JSON schema": {"response_format": ResponseFormat("json_schema", SCHEMA)},
    "tool call (required)": {
        "tools": (TOOL,),
        "tool_choice": "required",
        "parallel_tool_calls": False,
    },
}


def request(mode: str, seed: int, tokens: int) -> GenerationRequest:
    return GenerationRequest.chat(
        [("user", "Tell me about it.")], seed=seed, max_tokens=tokens, **MODES[mode]
    )


async def speed(engine: TorchEngine, mode: str, seeds: int, tokens: int) -> tuple[float, int]:
    """Median tokens/s over the seeds, and the median answer length."""
    rates, lengths = [], []
    for seed in range(seeds):
        stamps = [time.perf_counter() async for _ in engine.generate(request(mode, seed, tokens))]
        # Decode speed: from the first token on (the prompt's prefill is the same for all).
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        lengths.append(len(stamps))
    return statistics.median(rates), int(statistics.median(lengths))


async def grammar_only(engine: TorchEngine, tokens: int) -> float:
    """Microseconds per token of the mask alone, replaying one schema answer."""
    req = request("JSON schema", 0, tokens)
    text = "".join([c.text async for c in engine.generate(req)])
    ids = engine._tokenizer.encode(text, add_special_tokens=False)
    compiler = engine._constraints
    assert compiler is not None
    guide = compiler.guide(req)
    assert guide is not None
    logits = torch.zeros(1, engine._model.get_output_embeddings().weight.shape[0])
    logits = logits.to(engine.device)
    start = time.perf_counter()
    for token in ids:
        guide.fill()
        guide.apply(logits)
        guide.advance([token])
    if engine.device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(ids) * 1e6


def replay(engine: TorchEngine, req: GenerationRequest, ids: list[int], guided: bool) -> float:
    """Microseconds per token of the model stepping through ``ids`` (same tokens, same
    positions), with or without the grammar masking each step: the fair comparison."""
    from transformers import DynamicCache

    model = engine._model
    prompt = engine._tokenizer(engine.prompt_text(req), return_tensors="pt").input_ids
    guide = engine._constraints.guide(req) if guided and engine._constraints else None
    cache = DynamicCache(config=model.config)
    step = prompt.to(engine.device)
    start = 0.0
    with torch.inference_mode():
        for n, token in enumerate(ids):
            if n == 1:
                start = time.perf_counter()  # after the prompt's prefill
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
            if guide is not None:
                guide.fill()
                logits = guide.apply(logits)
                guide.advance([token])
            int(torch.argmax(logits))  # the host round trip sampling makes
            step = torch.tensor([[token]], device=engine.device)
    return (time.perf_counter() - start) / (len(ids) - 1) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=160)
    args = parser.parse_args()
    configure_logging(level="warning")
    engine = TorchEngine(args.model, device=args.device)
    await engine.load()
    await speed(engine, "JSON schema", 1, args.tokens)  # warm-up (llguidance tokenizer)
    results = {mode: await speed(engine, mode, args.seeds, args.tokens) for mode in MODES}
    free = results["free text"][0]
    rows = [
        [
            mode,
            f"{rate:.0f}",
            f"{1e6 / rate:.0f}",
            length,
            "—" if mode == "free text" else f"{(free / rate - 1):+.1%}",
        ]
        for mode, (rate, length) in results.items()
    ]
    mask = await grammar_only(engine, args.tokens)
    rows.append(["grammar alone (no model)", "", f"{mask:.0f}", "", f"{mask * free / 1e6:+.1%}"])
    req = request("JSON schema", 0, args.tokens)
    ids = engine._tokenizer.encode(
        "".join([c.text async for c in engine.generate(req)]), add_special_tokens=False
    )
    bare = statistics.median(replay(engine, req, ids, guided=False) for _ in range(args.seeds))
    guided = statistics.median(replay(engine, req, ids, guided=True) for _ in range(args.seeds))
    rows.append(["schema answer replayed, model only", f"{1e6 / bare:.0f}", f"{bare:.0f}",
                 len(ids), "—"])  # fmt: skip
    rows.append(["same tokens, model + grammar", f"{1e6 / guided:.0f}", f"{guided:.0f}",
                 len(ids), f"{guided / bare - 1:+.1%}"])  # fmt: skip
    await engine.close()
    print(machine_line())
    print(f"model {args.model.name}, device {args.device}, {args.seeds} seeds, temperature 1")
    headers = ["decoding", "tokens/s", "µs/token", "answer tokens", "time vs free text"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    asyncio.run(main())
