"""One stream while other processes take CPU: the server with adaptive threads (the default)
against the same server with --no-adaptive-threads, quiet and beside busy processes.

    python bench/contention.py [--busy 1] [--tokens 256] [--rounds 3] [--dtype auto]
                               [--quantization int8]

Both servers serve the benchmark's SmolLM2-135M-shaped random Llama (see throughput.py);
each round streams one completion (temperature 0.8, top_p 0.95, `--tokens` new tokens) from
each server quiet, then with `--busy` processes spinning at normal priority beside it (what
another program on the machine does). Prints each server's median tok/s per condition and
the ratio adaptive / fixed measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
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
)

SERVERS = {"adaptive": [], "fixed": ["--no-adaptive-threads"]}
SPIN = "while True: pass"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--busy", type=int, default=1, help="spinning processes beside the server")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="int8")
    return p.parse_args()


CAP_S = 30.0  # a stream that has not ended by then is cut: its rate so far is the figure


def stream_rate(url: str, tokens: int) -> float:
    """Tokens a second of one streamed completion, first byte to last (or to CAP_S: a server
    that collapses under the busy processes would take minutes)."""
    body = {"model": "smollm2-135m-random", "prompt": "hello " * 64, "max_tokens": tokens,
            "temperature": 0.8, "top_p": 0.95, "ignore_eos": True, "stream": True}  # fmt: skip
    count, start = 0, time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            count += line.startswith("data: {")
            if time.perf_counter() - start > CAP_S:
                break  # closing the stream aborts the request
    return count / (time.perf_counter() - start)


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]


def main() -> None:
    a = parse_args()
    if note := busy_warning():
        print(note)
    model = ensure_model_dir(DEFAULT_MODEL_DIR, ModelSpec())
    flags = ["--dtype", a.dtype, "--quantization", a.quantization, "--embedding-model", "none"]
    servers: dict[str, tuple[ServerProcess, str]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, extra in SERVERS.items():
                port = free_port()
                args = [*serve_command(model, port, 1, [*flags, *extra]),
                        "--data-dir", f"{tmp}/{name}"]  # fmt: skip
                server = ServerProcess(args, Path(tmp) / f"{name}.log")
                server.start()
                server.wait_healthy(f"http://127.0.0.1:{port}", 600)
                servers[name] = (server, f"http://127.0.0.1:{port}")
            for _server, url in servers.values():
                stream_rate(url, 16)  # warm-up
            for _ in range(a.rounds):
                for condition in ("quiet", f"{a.busy} busy"):
                    spinning = busy(a.busy) if condition != "quiet" else []
                    try:
                        time.sleep(0.5 if spinning else 0)
                        for name, (_, url) in servers.items():
                            rates.setdefault((name, condition), []).append(
                                stream_rate(url, a.tokens)
                            )
                    finally:
                        for p in spinning:
                            p.kill()
        finally:
            for server, _ in servers.values():
                server.stop()
    report(rates, a)


def report(rates: dict[tuple[str, str], list[float]], a: argparse.Namespace) -> None:
    print(f"one stream, {a.tokens} tokens, --dtype {a.dtype} --quantization {a.quantization}, "
          f"{a.rounds} rounds (median tok/s):")  # fmt: skip
    for condition in dict.fromkeys(c for _, c in rates):
        adaptive = statistics.median(rates[("adaptive", condition)])
        fixed = statistics.median(rates[("fixed", condition)])
        print(f"  {condition:8s} adaptive {adaptive:7.1f}  fixed (every core) {fixed:7.1f}  "
              f"ratio {adaptive / fixed:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
