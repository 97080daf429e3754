"""Throughput of the live server against transformers, measured in one run on one machine.

    python bench/throughput.py                      # full run: baselines, then the server
    python bench/throughput.py --baselines-only     # transformers numbers only
    python bench/throughput.py --server-url http://127.0.0.1:8000   # a server already running
    python bench/throughput.py --precisions fp32,bf16,int8 --samplings temp,top_p

The model is SmolLM2-135M-shaped with random weights in fp32, built once under
var/bench-models/. Every request generates exactly --max-tokens tokens (EOS ignored), so all
sides do the same work. Targets: 1 stream >= 1.3x transformers `generate`; 32 streams >= 1.5x
transformers' raw B=32 decode step with a KV cache (no sampling loop, no prefill in the timing),
4x for bf16 and auto (issue 14).

It first prints the machine (CPU model and features, threads, a measured read bandwidth) and
the bandwidth roofline of one stream per weight format (bandwidth / weight bytes per token).
The server runs once per precision (fp32: --dtype float32; bf16: --dtype bfloat16; auto:
--dtype auto; int8: --dtype auto --quantization int8), each with greedy requests, temperature
0.8, and temperature 0.8 with top_p 0.95 as most clients send, the samplings of a level
interleaved round by round (each round: c clients, one request each, all at once; each
round's tok/s is printed, which shows the machine's noise); a precision whose flags the
server refuses is skipped with a note. `fp32-nocache` is fp32 with --no-prefix-caching: with
both in --precisions it prints what prefix caching costs traffic that shares nothing
(target: >= 0.95x).

With --llama-cpp DIR (a llama.cpp tree with llama-server built), the precisions
llama.cpp-f32, llama.cpp-bf16 and llama.cpp-q8_0 run llama-server on the same weights converted
to GGUF, under the same load, and each genserve precision is set against its peer (fp32 against
f32, bf16 and auto against bf16, int8 against q8_0; target: >= 1.0x). See bench/llamacpp.py.
The precision transformers-serve runs `transformers serve --continuous-batching` on the fp32
weights, set against fp32 (bench/hf_serve.py).

--device cuda (or auto on a machine with a GPU) runs the transformers baselines on the GPU too
and starts the server with --device cuda: the ratios then compare like with like there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import hf_serve
import llamacpp
from common import (
    DEFAULT_MODEL_DIR,
    SPEC_FILE,
    ModelSpec,
    PromptSet,
    ServerProcess,
    build_prompts,
    busy_warning,
    ensure_model_dir,
    free_port,
    percentile,
    serve_command,
    thread_env,
)
from machine import Machine, describe, parameter_count, roofline_tok_s

# Rounds per level: fewer clients get more so every level runs long enough to time; 32 gets
# two so that its samplings run interleaved both ways (interleaved_levels).
DEFAULT_ROUNDS = {1: 3, 8: 2, 32: 2}
TARGET_SINGLE = 1.3
TARGET_BATCH = 1.5
RAW_BATCH = 32
TARGET_BATCH_BF16 = 4.0  # issue 14: bf16 at 32 streams >= 4x transformers' raw B=32 step
TARGET_ROOFLINE = 0.7  # issue 14: one stream at 0.7x the bandwidth roofline
TARGET_TOP_P = 0.9  # issue 14: top_p 0.95 costs at most 10% of plain temperature at 32 streams
TARGET_PAGING = 0.95  # issue 16: prefix caching costs at most 5% where nothing is shared
TARGET_PEER = 1.0  # at least as fast as llama.cpp on the same weights, load and machine
TARGET_LONG_TTFT_S = 0.15  # issue 14: a 512-token prompt alone answers its first token in 0.15 s
LONG_TTFT_PRECISIONS = ("bf16", "auto")  # ... with bf16 (auto is bf16 where the CPU has it)
PRECISION_ARGS = {
    "fp32": ("--dtype", "float32"),
    # The same server without prefix caching: what the cache's bookkeeping costs unshared
    # traffic (every prompt here is distinct).
    "fp32-nocache": ("--dtype", "float32", "--no-prefix-caching"),
    "bf16": ("--dtype", "bfloat16"),
    "auto": ("--dtype", "auto"),
    "int8": ("--dtype", "auto", "--quantization", "int8"),
}
KNOWN_PRECISIONS = {**PRECISION_ARGS, **{p: (f"llama-server {f} GGUF",)
                                         for p, f in llamacpp.FORMATS.items()},
                    hf_serve.NAME: ("transformers serve --continuous-batching",)}  # fmt: skip
SAMPLINGS = {
    "greedy": {"temperature": 0},
    "temp": {"temperature": 0.8},
    "top_p": {"temperature": 0.8, "top_p": 0.95},
}


@dataclass(frozen=True, slots=True)
class BenchConfig:
    model_dir: Path
    prompt_tokens: int
    max_tokens: int
    concurrency: tuple[int, ...]
    rounds: tuple[int, ...]
    prompt_format: str
    server_url: str | None
    server_args: tuple[str, ...]
    api_key: str | None
    model_id: str | None
    baselines: bool
    server: bool
    json_path: Path | None
    health_timeout_s: float
    threads: int | None
    precisions: tuple[str, ...] = ("fp32",)
    samplings: tuple[str, ...] = ("greedy",)
    bandwidth_gib: float = 1.0
    long_prompt_tokens: int = 512  # 0: no long-prompt TTFT run
    long_prompt_rounds: int = 5
    llama_cpp: Path | None = None  # a llama.cpp tree: its llama-server precisions can run
    device: str = "cpu"  # where the baselines run and the server computes: "cpu" or "cuda"
    unknown_fields: tuple[str, ...] = ()  # request fields the server under test refuses


@dataclass(frozen=True, slots=True)
class Rate:
    tokens: int
    seconds: float
    tok_s: float


@dataclass(frozen=True, slots=True)
class LevelResult:
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    tok_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    # Requests that did not return exactly max_tokens: non-zero means unequal work.
    short_requests: int
    precision: str = "fp32"
    sampling: str = "greedy"
    prompt_tokens: int = 0  # 0: the run's --prompt-tokens; else a long prompt sent alone


@dataclass(frozen=True, slots=True)
class Ratio:
    name: str
    value: float | None
    target: float
    met: bool


@dataclass(slots=True)
class Report:
    settings: dict[str, Any]
    hf_generate: Rate | None = None
    hf_raw_decode_b32: Rate | None = None
    server: list[LevelResult] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    machine: dict[str, Any] | None = None
    roofline_tok_s: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # precisions the server refused


@dataclass(slots=True)
class StreamState:
    """What one streamed request has shown so far."""

    start: float
    ttft_s: float | None = None
    chunks: int = 0
    usage_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class RequestResult:
    ttft_s: float
    tokens: int


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, nargs="+", help="per concurrency level (default 3/2/2)")
    p.add_argument(
        "--prompt-format",
        choices=["text", "ids"],
        default="text",
        help="send the prompt as text, or as a list of token ids (OpenAI allows both)",
    )
    p.add_argument("--server-url", help="use a running server instead of starting one")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument")
    p.add_argument("--api-key", help="bearer key, if the server requires one")
    p.add_argument("--model-id", help="model to request (default: the first of GET /v1/models)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--baselines-only", action="store_true")
    mode.add_argument("--server-only", action="store_true")
    p.add_argument("--json", type=Path, dest="json_path", help="also write the results here")
    p.add_argument("--health-timeout", type=float, default=300.0)
    p.add_argument("--threads", type=int, help="torch threads here and in the server")
    p.add_argument(
        "--precisions",
        default="fp32,bf16,int8",
        help=f"comma-separated, of {','.join(KNOWN_PRECISIONS)}; one server each",
    )
    p.add_argument(
        "--llama-cpp",
        type=Path,
        help="llama.cpp source tree with build/bin/llama-server: its precisions can run",
    )
    p.add_argument(
        "--samplings",
        default="greedy,temp,top_p",
        help="comma-separated: greedy (temperature 0), temp (0.8), top_p (0.8 + 0.95)",
    )
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="tensor summed for bandwidth")
    p.add_argument(
        "--long-prompt",
        type=int,
        default=512,
        help="TTFT of a prompt this long sent alone (one token back), per precision; 0: skip",
    )
    p.add_argument("--long-prompt-rounds", type=int, default=5)
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="baselines and server on this device (auto: cuda where torch sees one)",
    )
    a = p.parse_args(argv)
    if min(a.prompt_tokens, a.max_tokens, *a.concurrency) < 1:
        p.error("--prompt-tokens, --max-tokens and --concurrency must be positive")
    precisions = _choices(p, a.precisions, KNOWN_PRECISIONS)
    _check_llama_cpp(p, a.llama_cpp, precisions)
    samplings = _choices(p, a.samplings, SAMPLINGS)
    return BenchConfig(
        model_dir=a.model_dir, prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens,
        concurrency=tuple(a.concurrency), rounds=_rounds(p, a.concurrency, a.rounds),
        prompt_format=a.prompt_format, server_url=a.server_url,
        server_args=tuple(a.server_arg), api_key=a.api_key, model_id=a.model_id,
        baselines=not a.server_only,
        server=not a.baselines_only, json_path=a.json_path, health_timeout_s=a.health_timeout,
        threads=a.threads, precisions=precisions, samplings=samplings,
        bandwidth_gib=a.bandwidth_gib, long_prompt_tokens=max(0, a.long_prompt),
        long_prompt_rounds=max(1, a.long_prompt_rounds), llama_cpp=a.llama_cpp,
        device=_device(a.device),
    )  # fmt: skip


def _device(asked: str) -> str:
    if asked != "auto":
        return asked
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_llama_cpp(p: argparse.ArgumentParser, root: Path | None, names: tuple[str, ...]) -> None:
    wanted = [n for n in names if n in llamacpp.FORMATS]
    if wanted and root is None:
        p.error(f"{', '.join(wanted)} need --llama-cpp DIR")
    if wanted and (why := llamacpp.LlamaCpp(root).check()):
        p.error(f"--llama-cpp: {why}")


def _choices(p: argparse.ArgumentParser, given: str, known: dict) -> tuple[str, ...]:
    names = tuple(n.strip() for n in given.split(",") if n.strip())
    if not names or any(n not in known for n in names):
        p.error(f"{given!r}: choose from {', '.join(known)}")
    return names


def _rounds(
    p: argparse.ArgumentParser, levels: list[int], given: list[int] | None
) -> tuple[int, ...]:
    if given is None:
        return tuple(DEFAULT_ROUNDS.get(c, 1) for c in levels)
    if len(given) != len(levels):
        p.error("--rounds needs one value per --concurrency level")
    return tuple(given)


# --------------------------------------------------------------------------- baselines


def run_baselines(cfg: BenchConfig, prompts: PromptSet) -> tuple[Rate, Rate]:
    """transformers in this process, default threads, the same weights the server loads, on
    the run's device."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model_dir), dtype=torch.float32)
    model = model.to(dev).eval()
    with torch.inference_mode():
        single = torch.tensor(prompts.ids[:1], device=dev)
        hf_generate(model, single, min(cfg.max_tokens, 4))  # warm-up: kernels, allocator
        gen = hf_generate(model, single, cfg.max_tokens)
        # Warm up the B=32 decode shapes on a short prompt: a second full prefill costs tens of
        # seconds on a small CPU.
        short = [ids[:8] for ids in prompts.ids[:RAW_BATCH]]
        raw_decode(model, torch.tensor(short, device=dev), 2)
        raw = raw_decode(model, torch.tensor(prompts.ids[:RAW_BATCH], device=dev), cfg.max_tokens)
    del model
    gc.collect()  # give the memory back before the server loads its own copy
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return gen, raw


def _synced(device: Any) -> float:
    """perf_counter once the device's queued work is done (a GPU's kernels run async)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def hf_generate(model: Any, input_ids: Any, new_tokens: int) -> Rate:
    """`generate` as most people call it: greedy, one stream, min_new_tokens to ignore EOS."""
    import torch

    start = _synced(input_ids.device)
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )  # fmt: skip
    seconds = _synced(input_ids.device) - start
    tokens = int(out.shape[1] - input_ids.shape[1])
    return Rate(tokens=tokens, seconds=seconds, tok_s=tokens / seconds)


def raw_decode(model: Any, input_ids: Any, steps: int) -> Rate:
    """The bare batched decode step: forward + argmax on a DynamicCache, nothing else.

    This is the ceiling a server built on transformers' forward would reach with a fixed
    batch; the prefill is left out of the timing because it is not a decode step.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # logits_to_keep=1: the full [32, P, 49152] fp32 logits would be ~800 MB for nothing.
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    start = _synced(input_ids.device)
    for _ in range(steps):
        out = model(input_ids=next_ids, cache=cache, use_cache=True)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    seconds = _synced(input_ids.device) - start
    tokens = int(input_ids.shape[0]) * steps
    return Rate(tokens=tokens, seconds=seconds, tok_s=tokens / seconds)


# --------------------------------------------------------------------------- server load


def request_body(
    cfg: BenchConfig, model_id: str, prompts: PromptSet, i: int, n: int, sampling: str = "greedy"
) -> dict:
    prompt: str | list[int] = prompts.texts[i] if cfg.prompt_format == "text" else prompts.ids[i]
    body = {
        "model": model_id, "prompt": prompt, "max_tokens": n, **SAMPLINGS[sampling],
        "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM-style extra field: every request does the same work
    }  # fmt: skip
    return {k: v for k, v in body.items() if k not in cfg.unknown_fields}


def load_client(cfg: BenchConfig, base_url: str) -> aiohttp.ClientSession:
    """The load generator's HTTP client: aiohttp, whose per-chunk cost is a third of httpx's
    (0.10 vs 0.29 s of CPU for a round of 32 x 128 streamed tokens). The client shares the
    server's cores here, and the engine's steps lost ~2.4x the CPU other processes took
    from them (a 9%-of-a-core noise process slowed an in-process round 11%), so a heavy
    client measured the client as much as the server. No proxy from the environment
    (aiohttp's default) may sit between us and loopback."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return aiohttp.ClientSession(
        base_url=base_url, headers=headers, timeout=aiohttp.ClientTimeout(total=600.0),
        connector=aiohttp.TCPConnector(limit=max(cfg.concurrency) + 8),
    )  # fmt: skip


async def stream_request(client: aiohttp.ClientSession, body: dict) -> RequestResult:
    """One streamed completion. Sent again, once, where a kept-alive connection turned out
    closed before the request went out: llama-server closed one after a one-token stream
    (2-core EPYC, 2026-12-04), and aiohttp retries only idempotent methods itself."""
    try:
        return await _stream_once(client, body)
    except (aiohttp.ClientOSError, aiohttp.ClientConnectionResetError) as e:
        if "request body" not in str(e) and "closing transport" not in str(e):
            raise
        return await _stream_once(client, body)


async def _stream_once(client: aiohttp.ClientSession, body: dict) -> RequestResult:
    state = StreamState(start=time.perf_counter())
    async with client.post("/v1/completions", json=body) as resp:
        if resp.status != 200:
            detail = (await resp.read()).decode(errors="replace")[:500]
            raise RuntimeError(f"/v1/completions answered {resp.status}: {detail}")
        async for raw in resp.content:  # one SSE line at a time
            if not raw.startswith(b"data:"):
                continue
            data = raw[5:].strip()
            if data == b"[DONE]":
                break
            _consume(state, json.loads(data), time.perf_counter())
    ttft = state.ttft_s if state.ttft_s is not None else time.perf_counter() - state.start
    tokens = state.usage_tokens if state.usage_tokens is not None else state.chunks
    return RequestResult(ttft_s=ttft, tokens=tokens)


def _consume(state: StreamState, chunk: dict, now: float) -> None:
    if "error" in chunk:
        raise RuntimeError(f"error in stream: {chunk['error']}")
    texts = [c.get("text") or "" for c in chunk.get("choices") or []]
    # One chunk per token is what servers send; usage, when present, is the exact count.
    state.chunks += sum(1 for t in texts if t)
    if state.ttft_s is None and any(texts):
        state.ttft_s = now - state.start
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        state.usage_tokens = int(usage["completion_tokens"])


async def run_level(
    client: aiohttp.ClientSession, bodies: list[list[dict]], concurrency: int, expected: int
) -> LevelResult:
    """`concurrency` clients at once, each sending its own bodies one after another."""

    async def one_client(mine: list[dict]) -> list[RequestResult]:
        return [await stream_request(client, body) for body in mine]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(mine) for mine in bodies))
    wall = time.perf_counter() - start
    return summarize(concurrency, [([r for rs in per_client for r in rs], wall)], expected)


async def first_model(client: aiohttp.ClientSession) -> str:
    async with client.get("/v1/models") as resp:
        return (await resp.json())["data"][0]["id"]


async def drive_server(
    cfg: BenchConfig, base_url: str, prompts: PromptSet, precision: str = "fp32",
    long: PromptSet | None = None,
) -> list[LevelResult]:  # fmt: skip
    async with load_client(cfg, base_url) as client:
        model_id = cfg.model_id or await first_model(client)
        await stream_request(client, request_body(cfg, model_id, prompts, 0, 8))  # warm-up
        levels = await interleaved_levels(cfg, client, model_id, prompts, precision)
        if long is not None:
            try:
                level = await long_prompt_level(cfg, client, model_id, long)
            except RuntimeError as e:  # e.g. a server whose --max-model-len is shorter
                print(f"  {precision} {long.tokens}-token prompt skipped: {e}", flush=True)
                return levels
            levels.append(replace(level, precision=precision))
            print(f"  {precision} {long.tokens}-token prompt alone: TTFT p50 "
                  f"{level.ttft_p50_ms:.0f} ms", flush=True)  # fmt: skip
    return levels


async def interleaved_levels(
    cfg: BenchConfig, client: aiohttp.ClientSession, model_id: str, prompts: PromptSet,
    precision: str,
) -> list[LevelResult]:  # fmt: skip
    """Each concurrency level as `rounds` passes; a pass runs one round of every sampling (each
    of the c clients sends one request, all at once), in order on even passes and reversed on
    odd ones. The samplings of a level then share the machine's minutes (temp, top_p, top_p,
    temp: a drift in the machine's speed falls on both alike), where one sampling's rounds
    after another's made their ratio swing from 0.88x to 1.13x between runs of the same code
    (a 2-core VM). Every prompt is used once (prompt 0 was the run's warm-up)."""
    levels: list[LevelResult] = []
    next_prompt = 1
    for c, rounds in zip(cfg.concurrency, cfg.rounds, strict=True):
        # Untimed: c short requests, so that the level's first timed round does not pay alone
        # for the batch shapes the server has not run yet (the first of two samplings at 32
        # streams showed a TTFT p50 1.4x the second's without it).
        warm = [request_body(cfg, model_id, prompts, next_prompt + j, 8) for j in range(c)]
        next_prompt += c
        await run_round(client, warm)
        done: dict[str, list[tuple[list[RequestResult], float]]] = {s: [] for s in cfg.samplings}
        for k in range(rounds):
            for sampling in cfg.samplings if k % 2 == 0 else cfg.samplings[::-1]:
                bodies = [
                    request_body(cfg, model_id, prompts, next_prompt + j, cfg.max_tokens, sampling)
                    for j in range(c)
                ]
                next_prompt += c
                done[sampling].append(await run_round(client, bodies))
        for sampling, passes in done.items():
            level = summarize(c, passes, cfg.max_tokens)
            levels.append(replace(level, precision=precision, sampling=sampling))
            each = ", ".join(f"{sum(r.tokens for r in rs) / w:.1f}" for rs, w in passes)
            print(f"  {precision} {sampling} c={c}: {level.tok_s:.1f} tok/s (rounds: {each})",
                  flush=True)  # fmt: skip
    return levels


async def run_round(
    client: aiohttp.ClientSession, bodies: list[dict]
) -> tuple[list[RequestResult], float]:
    """One request per client, all at once: (results, wall seconds)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(stream_request(client, b) for b in bodies))
    return list(results), time.perf_counter() - start


def summarize(
    concurrency: int, passes: list[tuple[list[RequestResult], float]], expected: int
) -> LevelResult:
    """One level from its rounds: tokens over the rounds' summed wall time."""
    results = [r for rs, _ in passes for r in rs]
    wall = sum(w for _, w in passes)
    tokens = sum(r.tokens for r in results)
    ttfts_ms = [r.ttft_s * 1000.0 for r in results]
    return LevelResult(
        concurrency=concurrency, requests=len(results), completion_tokens=tokens, wall_s=wall,
        tok_s=tokens / wall, ttft_p50_ms=percentile(ttfts_ms, 50),
        ttft_p95_ms=percentile(ttfts_ms, 95),
        short_requests=sum(1 for r in results if r.tokens != expected),
    )  # fmt: skip


async def long_prompt_level(
    cfg: BenchConfig, client: aiohttp.ClientSession, model_id: str, long: PromptSet
) -> LevelResult:
    """One long prompt at a time, one token back, sampled as clients do: the time to the first
    token is the prompt's prefill on an idle server. Each prompt is new (prompt 0 warms up,
    uncounted), so the prefix cache serves none of it."""
    sampling = "top_p"
    bodies = [request_body(cfg, model_id, long, i, 1, sampling) for i in range(len(long.ids))]
    await stream_request(client, bodies[0])
    level = await run_level(client, [bodies[1:]], 1, 1)
    return replace(level, sampling=sampling, prompt_tokens=long.tokens)


class FlagsRefused(Exception):
    """The server would not start with a precision's flags (not merged yet, or not here)."""


def run_server(
    cfg: BenchConfig, prompts: PromptSet, skipped: list[str], long: PromptSet | None = None
) -> list[LevelResult]:
    if cfg.server_url:
        url = cfg.server_url.rstrip("/")
        return asyncio.run(drive_server(cfg, url, prompts, "as served", long))
    levels: list[LevelResult] = []
    for precision in cfg.precisions:
        print(f"server {precision} ({' '.join(KNOWN_PRECISIONS[precision])}) ...", flush=True)
        try:
            levels += run_precision(cfg, prompts, precision, long)
        except FlagsRefused as e:
            note = f"{precision} skipped: the server refused {' '.join(PRECISION_ARGS[precision])}"
            skipped.append(f"{note} ({e})")
            print(f"  {skipped[-1]}", flush=True)
    return levels


def run_precision(
    cfg: BenchConfig, prompts: PromptSet, precision: str, long: PromptSet | None = None
) -> list[LevelResult]:
    port = free_port()
    if precision == hf_serve.NAME:
        cfg = replace(cfg, unknown_fields=hf_serve.UNKNOWN_FIELDS)
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as tmp:
        log_path = Path(tmp) / "server.log"
        server = start_server(cfg, precision, port, log_path)
        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_or_refused(server, base_url, cfg.health_timeout_s)
            if precision in PRECISION_ARGS:
                print(f"  {precision} kernels {kernels_line(log_path)}", flush=True)
            return _drive_with_log(cfg, base_url, prompts, server, precision, long)
        finally:
            server.stop()


def kernels_line(log_path: Path) -> str:
    """What the server logged at start-up of its kernels against plain F.linear (measured on
    this machine in this run, or read from its cache): on a CPU without AMX, e.g.
    ONEDNN_MAX_CPU_ISA=AVX512_CORE, no chosen kernel may be slower than linear."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "kernels " in line and "against F.linear" in line:
            summary = line.split(": ", 1)[-1]
            return summary[summary.index("against F.linear") :] + (
                " (cached)" if "(cache)" in line else ""
            )
    return "against F.linear: not logged (no kernel policy on this device)"


def start_server(cfg: BenchConfig, precision: str, port: int, log_path: Path) -> ServerProcess:
    if precision == hf_serve.NAME:
        env = thread_env(cfg.threads)
        return hf_serve.start(cfg.model_dir, port, cfg.device, env, log_path)
    if precision in llamacpp.FORMATS:
        assert cfg.llama_cpp is not None  # parse_args refuses these without it
        # Each slot holds the longest request it will see: a level's, or the long prompt's.
        slot_tokens = max(cfg.prompt_tokens + cfg.max_tokens, cfg.long_prompt_tokens + 1) + 16
        return llamacpp.start(
            llamacpp.LlamaCpp(cfg.llama_cpp), cfg.model_dir, precision, port,
            max(cfg.concurrency), slot_tokens, cfg.threads, log_path,
        )  # fmt: skip
    # The same batch limit whatever levels run, so a subset run measures the same server.
    max_batch = max(RAW_BATCH, *cfg.concurrency)
    # the last --dtype given wins
    extra = [*PRECISION_ARGS[precision], "--device", cfg.device, *cfg.server_args]
    args = serve_command(cfg.model_dir, port, max_batch, extra)
    server = ServerProcess(args=args, log_path=log_path, env=thread_env(cfg.threads))
    server.start()
    return server


def _wait_or_refused(server: ServerProcess, base_url: str, timeout_s: float) -> None:
    """Healthy, or FlagsRefused when the server exits at once over its options."""
    try:
        server.wait_healthy(base_url, timeout_s)  # its errors carry the log
    except RuntimeError:
        log = server.log_tail()
        markers = ("No such option", "Invalid value", "must be one of", "quantization")
        if (
            server.proc is not None
            and server.proc.returncode is not None
            and any(m in log for m in markers)
        ):
            lines = [line.strip(" │╭╮╰╯─") for line in log.splitlines() if line.strip(" │╭╮╰╯─")]
            raise FlagsRefused(lines[-1] if lines else "no log") from None
        raise


def _drive_with_log(
    cfg: BenchConfig, base_url: str, prompts: PromptSet, server: ServerProcess, precision: str,
    long: PromptSet | None = None,
) -> list[LevelResult]:  # fmt: skip
    try:
        return asyncio.run(drive_server(cfg, base_url, prompts, precision, long))
    except Exception:
        # A failed request says little on its own; the server's traceback is in its log.
        print(f"server log tail:\n{server.log_tail()}")
        raise


# --------------------------------------------------------------------------- report


def compute_ratios(report: Report) -> list[Ratio]:
    """The figures from before issue 14 (the first precision run, fp32 by default, greedy or
    else the first sampling run), then per precision: 32 sampled streams against transformers'
    raw decode step, top_p against plain temperature, one stream against its roofline."""
    first = report.server[0].precision if report.server else "fp32"
    sampling = next((s for s in SAMPLINGS if _levels(report, first, s)), "greedy")
    by_c = _levels(report, first, sampling)
    raw = report.hf_raw_decode_b32
    pairs = [
        (f"server {sampling} c=1 / HF generate", by_c.get(1), report.hf_generate, TARGET_SINGLE),
        (f"server {sampling} c=32 / HF raw B=32 decode", by_c.get(32), raw, TARGET_BATCH),
    ]
    ratios = [_ratio(name, level, base, target) for name, level, base, target in pairs]
    for precision in dict.fromkeys(lv.precision for lv in report.server):
        top_p, temp = _levels(report, precision, "top_p"), _levels(report, precision, "temp")
        sampled = top_p.get(32) or temp.get(32)
        name = f"{precision} c=32 sampled / HF raw B=32 decode"
        target = TARGET_BATCH_BF16 if precision in ("bf16", "auto") else TARGET_BATCH
        ratios.append(_ratio(name, sampled, raw, target))
        name = f"{precision} c=32 top_p 0.95 / temperature 0.8"
        ratios.append(_ratio(name, top_p.get(32), temp.get(32), TARGET_TOP_P))
        roof = report.roofline_tok_s.get(precision)
        single = top_p.get(1) or temp.get(1)
        if roof and single:
            value = single.tok_s / roof
            ratios.append(Ratio(f"{precision} c=1 sampled / roofline {roof:.0f} tok/s", value,
                                TARGET_ROOFLINE, value >= TARGET_ROOFLINE))  # fmt: skip
    return ratios + _paging_ratios(report) + _peer_ratios(report)


def _peer_ratios(report: Report) -> list[Ratio]:
    """Each genserve precision against llama.cpp on its weight format, sampled as clients do,
    at one stream and at the most streams run, when both ran."""
    ratios = []
    pairs = [*llamacpp.PEERS.items(), *hf_serve.PEERS.items()]
    for precision, peer in pairs:
        for sampling in ("top_p", "temp"):
            ours, theirs = _levels(report, precision, sampling), _levels(report, peer, sampling)
            if ours and theirs:
                break
        else:
            continue
        for c in sorted({min(ours), max(ours)} & set(theirs)):
            name = f"{precision} {sampling} c={c} / {peer}"
            ratios.append(_ratio(name, ours[c], theirs[c], TARGET_PEER))
    return ratios


def long_ttft_lines(report: Report) -> list[str]:
    """Issue 14's prefill target: the long prompt's TTFT p50 with bf16, seconds."""
    lines = []
    for lv in report.server:
        if lv.prompt_tokens and lv.precision in (*LONG_TTFT_PRECISIONS, "as served"):
            s, target = lv.ttft_p50_ms / 1000.0, TARGET_LONG_TTFT_S
            verdict = "met" if s <= target else "NOT met"
            lines.append(f"{lv.precision} TTFT of a {lv.prompt_tokens}-token prompt alone, p50: "
                         f"{s:.3f} s (target <= {target} s: {verdict})")  # fmt: skip
    return lines


def _paging_ratios(report: Report) -> list[Ratio]:
    """fp32 with prefix caching against fp32 without, per sampling and level, when both ran."""
    ratios = []
    for sampling in SAMPLINGS:
        on, off = _levels(report, "fp32", sampling), _levels(report, "fp32-nocache", sampling)
        for c in sorted(set(on) & set(off)):
            name = f"fp32 {sampling} c={c} prefix caching on / off"
            ratios.append(_ratio(name, on[c], off[c], TARGET_PAGING))
    return ratios


def _levels(report: Report, precision: str, sampling: str) -> dict[int, LevelResult]:
    return {
        lv.concurrency: lv
        for lv in report.server
        if lv.precision == precision and lv.sampling == sampling and not lv.prompt_tokens
    }


def _ratio(name: str, level: LevelResult | None, base: Any, target: float) -> Ratio:
    value = level.tok_s / base.tok_s if level and base else None
    return Ratio(name, value, target, value is not None and value >= target)


def table_rows(report: Report) -> list[tuple[str, str, str, str]]:
    rows = []
    if report.hf_generate:
        rows.append(("transformers generate, 1 stream", f"{report.hf_generate.tok_s:.1f}", "", ""))
    if report.hf_raw_decode_b32:
        raw = report.hf_raw_decode_b32
        rows.append(("transformers raw decode step, B=32", f"{raw.tok_s:.1f}", "", ""))
    for lv in report.server:
        note = f" ({lv.short_requests} short)" if lv.short_requests else ""
        streams = "1 stream" if lv.concurrency == 1 else f"{lv.concurrency} streams"
        if lv.prompt_tokens:
            streams = f"{lv.prompt_tokens}-token prompt alone, 1 token"
        label = f"server {lv.precision} {lv.sampling}, {streams}{note}"
        rows.append((label, f"{lv.tok_s:.1f}",
                     f"{lv.ttft_p50_ms:.0f}", f"{lv.ttft_p95_ms:.0f}"))  # fmt: skip
    return rows


def ratio_lines(report: Report) -> list[str]:
    lines = []
    for r in report.ratios:
        shown = f"{r.value:.2f}x" if r.value is not None else "n/a"
        verdict = "met" if r.met else ("not run" if r.value is None else "NOT met")
        lines.append(f"{r.name}: {shown} (target >= {r.target}x: {verdict})")
    return lines


def print_report(report: Report) -> None:
    header = ("", "tok/s", "TTFT p50 ms", "TTFT p95 ms")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but the plain table keeps this usable alone
        for row in (header, *table_rows(report)):
            print(f"{row[0]:<44}{row[1]:>10}{row[2]:>14}{row[3]:>14}")
    else:
        table = Table(title="genserve throughput", caption=_settings_line(report))
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in table_rows(report):
            table.add_row(*row)
        Console().print(table)
    for line in [*report.skipped, *ratio_lines(report), *long_ttft_lines(report)]:
        print(line)


def _settings_line(report: Report) -> str:
    s = report.settings
    machine = report.machine or {}
    return (
        f"prompt {s['prompt_tokens']} tokens, {s['max_tokens']} new tokens; greedy: temperature 0,"
        f" temp: 0.8, top_p: 0.8 + top_p 0.95; {machine.get('cpu', 'CPU')}"
    )


def machine_section(cfg: BenchConfig, report: Report) -> Machine:
    """Print the machine and each precision's one-stream roofline; keep both in the report."""
    machine = describe(cfg.threads, cfg.bandwidth_gib)
    print(machine.line(), flush=True)
    if cfg.device == "cuda":
        import torch

        print(f"device: {torch.cuda.get_device_name()} (baselines and server; the roofline"
              " lines below are the CPU's)", flush=True)  # fmt: skip
    params = parameter_count(cfg.model_dir)
    for precision in cfg.precisions:
        roof = roofline_tok_s(machine, params, precision)
        report.roofline_tok_s[precision] = roof
        size = f"{params / 1e6:.1f}M weights x {machine.weight_bytes(precision):g} B"
        print(f"roofline {precision}: {machine.read_gb_s:.1f} GB/s / ({size}) = {roof:.1f} tok/s")
    report.machine = asdict(machine)
    return machine


# --------------------------------------------------------------------------- main


def _model_folder(path: Path) -> Path:
    """A folder that holds a model not built here (no bench-spec.json; e.g. a Qwen3 from
    bench/families.py --build-135m) is used as it is; the benchmark's own is (re)built."""
    if (path / "config.json").exists() and not (path / SPEC_FILE).exists():
        return path
    return ensure_model_dir(path, ModelSpec())


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    started = time.perf_counter()
    if warning := busy_warning():
        print(warning, flush=True)
    print(f"model folder: {_model_folder(cfg.model_dir)}", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model_dir))
    per_sampling = sum(c * r for c, r in zip(cfg.concurrency, cfg.rounds, strict=True))
    needed = 1 + sum(cfg.concurrency) + len(cfg.samplings) * per_sampling  # + warm-ups
    prompts = build_prompts(tokenizer, max(needed, RAW_BATCH), cfg.prompt_tokens)
    long = None
    if cfg.long_prompt_tokens:
        count, tokens = cfg.long_prompt_rounds + 1, cfg.long_prompt_tokens
        # A new seed each run: with --server-url, a rerun's prompts would be in the prefix cache.
        long = build_prompts(tokenizer, count, tokens, seed=time.time_ns())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("api_key",)}
    report = Report(settings=json.loads(json.dumps(settings, default=str)))
    machine_section(cfg, report)
    if cfg.baselines:
        print("transformers baselines ...", flush=True)
        report.hf_generate, report.hf_raw_decode_b32 = run_baselines(cfg, prompts)
        # printed now too: a server that fails later must not take these with it
        print(f"  generate, 1 stream: {report.hf_generate.tok_s:.1f} tok/s; raw B={RAW_BATCH}"
              f" decode: {report.hf_raw_decode_b32.tok_s:.1f} tok/s", flush=True)  # fmt: skip
    if cfg.server:
        print("server ...", flush=True)
        report.server = run_server(cfg, prompts, report.skipped, long)
    report.ratios = compute_ratios(report)
    print_report(report)
    print(f"total {time.perf_counter() - started:.0f} s")
    if cfg.json_path:
        cfg.json_path.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
