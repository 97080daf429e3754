"""Interactive latency while a Batch API batch runs: batch work must only fill free capacity.

    python bench/batch_priority.py [--batch-requests 500] [--streams 4] [--rounds 6]
        [--max-tokens 32] [--batch-max-tokens 32] [--max-batch-size 16] [--model REF]

Starts a server (the bundled starter model by default) on a fresh data dir. Baseline: ROUNDS
rounds of STREAMS concurrent streaming completions (temperature 0.8, top_p 0.95, as clients
sample; MAX_TOKENS with ignore_eos), each one's time to first token. Then it uploads a file of
BATCH_REQUESTS completion requests (the same sampling), creates a batch on /v1/completions,
waits until its requests are running, and runs the same rounds again while it does, reading the
batch's request_counts before and after. Then it cancels the batch and, once the engine is
idle, runs the baseline rounds again: the ratio's baseline is both baseline phases together, so
that a machine whose load drifts during the run (other work on it) skews it less.

Prints the machine and its load before and after, TTFT p50 and p90 of both phases and their
ratio (goal: p50 <= 1.5x), and the batch's progress during the loaded phase (goal: > 0).
Exits 1 naming each goal missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import ServerProcess, busy_warning, free_port, percentile

GOAL_RATIO = 1.5
SAMPLING = {"temperature": 0.8, "top_p": 0.95}
MODEL = "genserve-starter"


@dataclass
class Phase:
    ttfts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.ttfts, q)


@dataclass
class Run:
    baseline: Phase = field(default_factory=Phase)  # before the batch and after it, together
    loaded: Phase = field(default_factory=Phase)
    before: Phase = field(default_factory=Phase)
    after: Phase = field(default_factory=Phase)
    batch_before: dict = field(default_factory=dict)
    batch_after: dict = field(default_factory=dict)
    loaded_s: float = 0.0
    load: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=MODEL, help="model ref served (default: the starter)")
    p.add_argument("--batch-requests", type=int, default=500)
    p.add_argument("--streams", type=int, default=4, help="concurrent interactive streams")
    p.add_argument("--rounds", type=int, default=6, help="rounds of STREAMS streams per phase")
    p.add_argument("--max-tokens", type=int, default=32, help="per interactive stream")
    p.add_argument("--batch-max-tokens", type=int, default=32, help="per batch request")
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's slots")
    p.add_argument("--timeout", type=float, default=120.0)
    return p.parse_args()


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


async def stream_ttft(http: httpx.AsyncClient, model: str, i: int, a: argparse.Namespace) -> float:
    body = {"model": model, "prompt": f"Story {i}: once upon a time", "stream": True,
            "max_tokens": a.max_tokens, "ignore_eos": True, **SAMPLING}  # fmt: skip
    start = time.perf_counter()
    ttft = None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {") and json.loads(line[6:])["choices"]:
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("the stream ended without a token")
    return ttft


async def phase(http: httpx.AsyncClient, model: str, a: argparse.Namespace, out: Phase) -> None:
    for r in range(a.rounds):
        tasks = [stream_ttft(http, model, r * a.streams + i, a) for i in range(a.streams)]
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                out.errors.append(repr(result)[:120])
            else:
                out.ttfts.append(result)


def batch_file(model: str, a: argparse.Namespace) -> bytes:
    lines = [
        {"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": model, "prompt": f"Item {i}: a short description of",
                  "max_tokens": a.batch_max_tokens, "ignore_eos": True, **SAMPLING}}
        for i in range(a.batch_requests)
    ]  # fmt: skip
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


async def start_batch(http: httpx.AsyncClient, model: str, a: argparse.Namespace) -> str:
    files = {"file": ("bench.jsonl", batch_file(model, a), "application/jsonl")}
    r = await http.post("/v1/files", data={"purpose": "batch"}, files=files)
    r.raise_for_status()
    body = {"input_file_id": r.json()["id"], "endpoint": "/v1/completions",
            "completion_window": "24h"}  # fmt: skip
    r = await http.post("/v1/batches", json=body)
    r.raise_for_status()
    return r.json()["id"]


async def until_running(http: httpx.AsyncClient, batch_id: str, timeout_s: float) -> None:
    """Until the engine runs batch work (sequences running with no interactive call open)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = (await http.get("/health")).json().get("models", {})
        if any(m["running"] > 0 for m in models.values()):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} did not start within {timeout_s:.0f} s")


async def measure(url: str, model: str, a: argparse.Namespace, run: Run) -> None:
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=a.timeout, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]  # the id it is served as
        await phase(http, model, argparse.Namespace(**{**vars(a), "rounds": 1}), Phase())  # warm
        await phase(http, model, a, run.before)
        batch_id = await start_batch(http, model, a)
        await until_running(http, batch_id, a.timeout)
        run.batch_before = (await http.get(f"/v1/batches/{batch_id}")).json()
        start = time.perf_counter()
        await phase(http, model, a, run.loaded)
        run.loaded_s = time.perf_counter() - start
        run.batch_after = (await http.get(f"/v1/batches/{batch_id}")).json()
        await http.post(f"/v1/batches/{batch_id}/cancel")
        await until_idle(http, a.timeout)
        await phase(http, model, a, run.after)  # the baseline again: the machine drifts
    run.baseline.ttfts = run.before.ttfts + run.after.ttfts
    run.baseline.errors = run.before.errors + run.after.errors


async def until_idle(http: httpx.AsyncClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = (await http.get("/health")).json().get("models", {})
        if all(m["running"] == 0 and m["waiting"] == 0 for m in models.values()):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the cancelled batch did not leave the engine")


def report(run: Run, a: argparse.Namespace) -> int:
    base, loaded = run.baseline, run.loaded
    ratio = loaded.p(50) / base.p(50) if base.ttfts and loaded.ttfts else float("nan")
    before, after = run.batch_before["request_counts"], run.batch_after["request_counts"]
    progressed = after["completed"] - before["completed"]
    load = f"{run.load[0]:.2f} / {run.load[1]:.2f}"
    print(f"machine: {machine()}; load average before/after: {load}")
    shape = f"{a.streams} streams x {a.rounds} rounds, {a.max_tokens} tokens each"
    print(f"server: {a.model}, --max-batch-size {a.max_batch_size}; {shape}; {SAMPLING}")
    phases = (("no batch, before", run.before), ("no batch, after", run.after),
              ("no batch, both", base), (f"{a.batch_requests}-request batch", loaded))  # fmt: skip
    for name, ph in phases:
        print(f"  TTFT {name:>22}: p50 {ph.p(50) * 1000:7.1f} ms  p90 {ph.p(90) * 1000:7.1f} ms"
              f"  ({len(ph.ttfts)} streams, {len(ph.errors)} failed)")  # fmt: skip
    print(f"  ratio p50 loaded / baseline: {ratio:.2f}x (goal <= {GOAL_RATIO}x)")
    rate = progressed / run.loaded_s if run.loaded_s else 0.0
    print(
        f"  batch: {progressed} requests finished during the loaded phase ({rate:.1f}/s); "
        f"{after['completed']}/{after['total']} done then; cancelled after the run"
    )
    missed = []
    if not ratio <= GOAL_RATIO:
        missed.append(f"TTFT ratio {ratio:.2f}x > {GOAL_RATIO}x")
    if progressed <= 0:
        missed.append("the batch made no progress while interactive streams ran")
    if base.errors or loaded.errors:
        missed.append(f"failed streams: {(base.errors + loaded.errors)[:3]}")
    for m in missed:
        print(f"MISSED: {m}")
    return 1 if missed else 0


def main() -> int:
    a = parse_args()
    if warning := busy_warning():
        print(warning)
    run = Run(load=[os.getloadavg()[0]])
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "genserve.cli", "serve", "--model", a.model,
                "--port", str(port), "--max-batch-size", str(a.max_batch_size),
                "--data-dir", tmp, "--embedding-model", "none"]  # fmt: skip
        server = ServerProcess(args, Path(tmp) / "server.log")
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            server.wait_healthy(url, 300)
            asyncio.run(measure(url, a.model, a, run))
        except Exception:
            print(f"server log tail:\n{server.log_tail(2000)}")
            raise
        finally:
            server.stop()
    run.load.append(os.getloadavg()[0])
    return report(run, a)


if __name__ == "__main__":
    sys.exit(main())
