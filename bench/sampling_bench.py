"""What the OpenAI sampling options cost per token in TorchEngine: logprobs, penalties, bias.

Decode speed (tokens/s, median over rounds, rounds interleaved) of the same greedy
request with nothing extra, with ``logprobs`` + ``top_logprobs=5``, with both
penalties and a ``logit_bias``, and with all of them. Device: CPU by default;
``--device cuda`` when a GPU is at hand.

    .venv/bin/python bench/sampling_bench.py [--model DIR] [--device cpu] [--tokens 96]
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
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.telemetry import configure_logging

PROMPT = "The GPU"
VARIANTS: dict[str, dict[str, Any]] = {
    "plain greedy": {},
    "logprobs, top_logprobs=5": {"logprobs": True, "top_logprobs": 5},
    "penalties + logit_bias (4 ids)": {
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "logit_bias": ((5, 1.0), (6, -1.0), (7, 2.0), (8, -100.0)),
    },
    "all of them": {
        "logprobs": True,
        "top_logprobs": 5,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "logit_bias": ((5, 1.0), (6, -1.0), (7, 2.0), (8, -100.0)),
    },
}


async def tokens_per_second(engine: TorchEngine, tokens: int, options: dict[str, Any]) -> float:
    request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0, **options)
    start = time.perf_counter()
    produced = 0
    async for chunk in engine.generate(request):
        produced += chunk.tokens
    return produced / (time.perf_counter() - start)


async def measure(model: Path, device: str, tokens: int, rounds: int) -> dict[str, float]:
    engine = TorchEngine(model, device=device, max_concurrency=1)
    await engine.load()
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for i in range(rounds + 1):
            for name, options in VARIANTS.items():
                speed = await tokens_per_second(engine, tokens, options)
                if i:  # round 0 warms up
                    samples[name].append(speed)
    finally:
        await engine.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure_logging(level="warning")
    torch.set_num_threads(args.threads)
    results = asyncio.run(measure(args.model, args.device, args.tokens, args.rounds))
    base = results["plain greedy"]
    rows = [
        (name, f"{speed:.0f}", f"{(base - speed) / base * 100:+.1f}%")
        for name, speed in results.items()
    ]
    print(markdown_table(["options", "tokens/s", "cost vs plain"], rows))
    print(
        f"\n{args.tokens} greedy tokens from {PROMPT!r}, {args.rounds} rounds, medians; "
        f"device {args.device}; {machine_line()}"
    )


if __name__ == "__main__":
    main()
