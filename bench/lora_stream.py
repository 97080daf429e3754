"""One stream through a LoRA adapter against one stream of its base model, in one run.

    python bench/lora_stream.py [--dtype auto] [--quantization int8] [--rounds 3]

On the SmolLM2-135M-shaped random model, with a random rank-8 adapter on every projection
(bench/costs.py's), one server: requests of --max-tokens tokens (EOS ignored, temperature 0.8,
top_p 0.95) alternate between the base and the adapter; each request's decode speed is its
tokens after the first over the time they took. Prints both and their ratio (decode.c's stack
adds an adapter's rank-r products beside the base model's linears, so a stream through one
reads its few extra weights too).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import httpx
from common import (
    DEFAULT_MODEL_DIR,
    ModelSpec,
    ServerProcess,
    busy_warning,
    ensure_model_dir,
    free_port,
    serve_command,
    streamed_decode_rate,
)
from costs import ADAPTERS, make_adapters

BASE = "smollm2-135m-random"


def decode_rate(url: str, model: str, max_tokens: int, i: int) -> float:
    body = {
        "model": model, "prompt": f"{i} hello there " * 10, "max_tokens": max_tokens,
        "temperature": 0.8, "top_p": 0.95, "ignore_eos": True, "stream": True,
    }  # fmt: skip

    async def one() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as http:
            return await streamed_decode_rate(http, body)

    return asyncio.run(one())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="none")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if warning := busy_warning():
        print(warning)
    ensure_model_dir(DEFAULT_MODEL_DIR, ModelSpec())
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="genserve-lora-") as tmp:
        adapters = make_adapters(DEFAULT_MODEL_DIR, Path(tmp))
        extra = ["--dtype", a.dtype, "--quantization", a.quantization, "--embedding-model",
                 "none", "--data-dir", tmp, *adapters]  # fmt: skip
        server = ServerProcess(serve_command(DEFAULT_MODEL_DIR, port, 8, extra), Path(tmp) / "log")
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            server.wait_healthy(url, 300)
            decode_rate(url, ADAPTERS[0], 8, -1)  # warm: the adapter's first use
            rates: dict[str, list[float]] = {BASE: [], ADAPTERS[0]: []}
            for k in range(a.rounds):
                for model in (BASE, ADAPTERS[0]) if k % 2 == 0 else (ADAPTERS[0], BASE):
                    rates[model].append(decode_rate(url, model, a.max_tokens, k))
        finally:
            server.stop()
    base, lora = (statistics.median(rates[m]) for m in (BASE, ADAPTERS[0]))
    shown = {m: ", ".join(f"{r:.0f}" for r in v) for m, v in rates.items()}
    print(f"--dtype {a.dtype} --quantization {a.quantization}, one stream of {a.max_tokens} tokens")
    print(f"  base    {base:6.1f} tok/s (rounds: {shown[BASE]})")
    print(f"  adapter {lora:6.1f} tok/s (rounds: {shown[ADAPTERS[0]]})")
    print(f"  adapter / base: {lora / base:.2f}x")


if __name__ == "__main__":
    main()
