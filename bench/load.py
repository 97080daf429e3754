"""Overload on loopback: N x the engine's batch capacity, only 200s and 429s, memory back.

    python bench/load.py [--multiple 4] [--batch 8] [--waves 5] [--max-tokens 64]

Starts a server on the bundled starter model with --max-batch-size BATCH and a small queue,
sends waves of MULTIPLE x BATCH concurrent requests with httpx (no retries: every status is
counted), then one more wave through the official openai client with retries on, and prints
the status counts, 429s without Retry-After, the client's success rate, and the server's RSS
before and after (goal: within 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path

import httpx
import openai
import psutil
from common import ServerProcess, free_port


async def wave(url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    body = {"model": "genserve-starter", "prompt": "def fibonacci(n):", "max_tokens": max_tokens,
            "ignore_eos": True}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as http:
        return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(n)])


async def retried(url: str, n: int, max_tokens: int) -> int:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=10)
    calls = [
        client.completions.create(
            model="genserve-starter", prompt="import os", max_tokens=max_tokens
        )
        for _ in range(n)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    return sum(1 for r in results if not isinstance(r, BaseException))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--multiple", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--waves", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "genserve.cli", "serve", "--port", str(port),
                "--max-batch-size", str(a.batch), "--max-waiting", str(a.batch),
                "--data-dir", tmp, "--embedding-model", "none"]  # fmt: skip
        server = ServerProcess(args=args, log_path=Path(tmp) / "server.log")
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            server.wait_healthy(url, 300)
            run(url, psutil.Process(server.proc.pid), a)
        finally:
            server.stop()


def run(url: str, proc: psutil.Process, a: argparse.Namespace) -> None:
    n = a.multiple * a.batch
    asyncio.run(wave(url, a.batch, a.max_tokens))  # warm-up
    before = proc.memory_info().rss
    codes: collections.Counter[int] = collections.Counter()
    missing_retry_after = 0
    for _ in range(a.waves):
        for r in asyncio.run(wave(url, n, a.max_tokens)):
            codes[r.status_code] += 1
            missing_retry_after += r.status_code == 429 and "retry-after" not in r.headers
    ok = asyncio.run(retried(url, n, a.max_tokens))
    after = proc.memory_info().rss
    print(f"{a.waves} waves of {n} concurrent requests ({a.multiple}x batch {a.batch})")
    print(f"  status counts: {dict(sorted(codes.items()))}")
    print(f"  429s without Retry-After: {missing_retry_after}")
    print(f"  openai client with retries: {ok}/{n} succeeded")
    change = (after - before) / before
    verdict = "within 10%" if abs(change) <= 0.10 else "NOT within 10%"
    mib = 2**20
    print(
        f"  server RSS {before / mib:.0f} MiB -> {after / mib:.0f} MiB ({change:+.1%}, {verdict})"
    )


if __name__ == "__main__":
    main()
