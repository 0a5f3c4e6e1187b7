"""TorchEngine through the RuntimeManager vs plain ``model.generate()``, same model and prompt.

Measures time to first token (TTFT) and decode speed (tokens/s) of:

- ``model.generate()`` — transformers' own loop, greedy, no streaming;
- ``TorchEngine`` directly — Kensho's streaming KV-cache loop in a worker thread;
- ``RuntimeManager`` — the same engine behind the circuit breaker, as the server uses it.

TTFT of plain ``generate`` is the time of ``generate(max_new_tokens=1)``. Medians over
rounds. Device: CPU by default; ``--device cuda`` when a GPU is at hand.

    .venv/bin/python bench/engine_bench.py [--model DIR] [--device cpu] [--tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from _table import machine_line, markdown_table
from kensho.demo import DEMO_MODEL_DIR
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.torch_engine import TorchEngine
from kensho.runtime.manager import RuntimeManager
from kensho.telemetry import configure_logging

PROMPT = "The GPU"


def plain_generate(model_dir: Path, device: str, tokens: int, rounds: int) -> tuple[float, float]:
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device)
    model.eval()
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    kwargs = {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": None}

    def timed(n: int) -> tuple[float, int]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.shape[1] - ids.shape[1]

    timed(tokens)  # warm-up
    ttft = statistics.median(timed(1)[0] for _ in range(rounds))
    runs = [timed(tokens) for _ in range(rounds)]
    tps = statistics.median(n / t for t, n in runs)
    return ttft, tps


async def streamed(
    source: TorchEngine | RuntimeManager, tokens: int, rounds: int
) -> tuple[float, float]:
    ttfts, speeds = [], []
    for i in range(rounds + 1):
        request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0)
        start = time.perf_counter()
        first = 0.0
        count = 0
        async for _ in source.generate(request):
            count += 1
            if count == 1:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        if i == 0:
            continue  # warm-up
        ttfts.append(first)
        speeds.append(count / total)
    return statistics.median(ttfts), statistics.median(speeds)


async def kensho_runs(
    model_dir: Path, device: str, tokens: int, rounds: int
) -> dict[str, tuple[float, float]]:
    engine = TorchEngine(model_dir, device=device)
    await engine.load()
    direct = await streamed(engine, tokens, rounds)
    manager = RuntimeManager(engine)
    await manager.start()
    managed = await streamed(manager, tokens, rounds)
    await manager.close()
    return {"TorchEngine (direct)": direct, "TorchEngine via RuntimeManager": managed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: a tiny model on 2 vCPUs is fastest single-threaded)",
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = {
        "transformers model.generate()": plain_generate(
            args.model, args.device, args.tokens, args.rounds
        )
    }
    results.update(asyncio.run(kensho_runs(args.model, args.device, args.tokens, args.rounds)))
    base_ttft, base_tps = results["transformers model.generate()"]
    rows = [
        (
            name,
            f"{ttft * 1e3:.2f}",
            f"{(ttft / base_ttft - 1) * 100:+.1f}%",
            f"{tps:.0f}",
            f"{(1 - tps / base_tps) * 100:+.1f}%",
        )
        for name, (ttft, tps) in results.items()
    ]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(
        f"engine_bench: {args.model.name}, prompt {PROMPT!r}, {args.tokens} tokens greedy, "
        f"{args.rounds} rounds, medians; device {device}; {machine_line()}"
    )
    print()
    print(
        markdown_table(
            ["path", "TTFT (ms)", "TTFT vs generate()", "tokens/s", "overhead vs generate()"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
