"""Throughput of the live server against transformers, measured in one run on one machine.

    python bench/throughput.py                      # full run: baselines, then the server
    python bench/throughput.py --baselines-only     # transformers numbers only
    python bench/throughput.py --server-url http://127.0.0.1:8000   # a server already running

The model is SmolLM2-135M-shaped with random weights in fp32, built once under
var/bench-models/. Every request generates exactly --max-tokens tokens (EOS ignored), so all
sides do the same work. Targets: 1 stream >= 1.3x transformers `generate`; 32 streams >= 1.5x
transformers' raw B=32 decode step with a KV cache (no sampling loop, no prefill in the timing).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
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

# Sequential requests per client: fewer clients get more rounds so every level runs long
# enough to time, and 32 clients x 1 round is already the largest batch.
DEFAULT_ROUNDS = {1: 3, 8: 2, 32: 1}
TARGET_SINGLE = 1.3
TARGET_BATCH = 1.5
RAW_BATCH = 32


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
    p.add_argument("--rounds", type=int, nargs="+", help="per concurrency level (default 3/2/1)")
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
    a = p.parse_args(argv)
    if min(a.prompt_tokens, a.max_tokens, *a.concurrency) < 1:
        p.error("--prompt-tokens, --max-tokens and --concurrency must be positive")
    return BenchConfig(
        model_dir=a.model_dir, prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens,
        concurrency=tuple(a.concurrency), rounds=_rounds(p, a.concurrency, a.rounds),
        prompt_format=a.prompt_format, server_url=a.server_url,
        server_args=tuple(a.server_arg), api_key=a.api_key, model_id=a.model_id,
        baselines=not a.server_only,
        server=not a.baselines_only, json_path=a.json_path, health_timeout_s=a.health_timeout,
        threads=a.threads,
    )  # fmt: skip


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
    """transformers in this process, default threads, the same weights the server loads."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        single = torch.tensor(prompts.ids[:1])
        hf_generate(model, single, min(cfg.max_tokens, 4))  # warm-up: kernels, allocator
        gen = hf_generate(model, single, cfg.max_tokens)
        # Warm up the B=32 decode shapes on a short prompt: a second full prefill costs tens of
        # seconds on a small CPU.
        raw_decode(model, torch.tensor([ids[:8] for ids in prompts.ids[:RAW_BATCH]]), 2)
        raw = raw_decode(model, torch.tensor(prompts.ids[:RAW_BATCH]), cfg.max_tokens)
    del model
    gc.collect()  # give the memory back before the server loads its own copy
    return gen, raw


def hf_generate(model: Any, input_ids: Any, new_tokens: int) -> Rate:
    """`generate` as most people call it: greedy, one stream, min_new_tokens to ignore EOS."""
    import torch

    start = time.perf_counter()
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )  # fmt: skip
    seconds = time.perf_counter() - start
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
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=next_ids, cache=cache, use_cache=True)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    seconds = time.perf_counter() - start
    tokens = int(input_ids.shape[0]) * steps
    return Rate(tokens=tokens, seconds=seconds, tok_s=tokens / seconds)


# --------------------------------------------------------------------------- server load


def request_body(cfg: BenchConfig, model_id: str, prompts: PromptSet, i: int, n: int) -> dict:
    prompt: str | list[int] = prompts.texts[i] if cfg.prompt_format == "text" else prompts.ids[i]
    return {
        "model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM-style extra field: every request does the same work
    }  # fmt: skip


async def stream_request(client: httpx.AsyncClient, body: dict) -> RequestResult:
    state = StreamState(start=time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:500]
            raise RuntimeError(f"/v1/completions answered {resp.status_code}: {detail}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
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
    client: httpx.AsyncClient, bodies: list[list[dict]], concurrency: int, expected: int
) -> LevelResult:
    """`concurrency` clients at once, each sending its own bodies one after another."""

    async def one_client(mine: list[dict]) -> list[RequestResult]:
        return [await stream_request(client, body) for body in mine]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(mine) for mine in bodies))
    wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    tokens = sum(r.tokens for r in results)
    ttfts_ms = [r.ttft_s * 1000.0 for r in results]
    return LevelResult(
        concurrency=concurrency, requests=len(results), completion_tokens=tokens, wall_s=wall,
        tok_s=tokens / wall, ttft_p50_ms=percentile(ttfts_ms, 50),
        ttft_p95_ms=percentile(ttfts_ms, 95),
        short_requests=sum(1 for r in results if r.tokens != expected),
    )  # fmt: skip


async def drive_server(cfg: BenchConfig, base_url: str, prompts: PromptSet) -> list[LevelResult]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 8)
    # trust_env=False: a proxy from the environment must not sit between us and loopback.
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=600.0, trust_env=False
    ) as client:
        model_id = cfg.model_id or (await client.get("/v1/models")).json()["data"][0]["id"]
        await stream_request(client, request_body(cfg, model_id, prompts, 0, 8))  # warm-up
        levels: list[LevelResult] = []
        next_prompt = 1  # prompt 0 was the warm-up; the rest are used once each
        for c, rounds in zip(cfg.concurrency, cfg.rounds, strict=True):
            bodies = [
                [request_body(cfg, model_id, prompts, next_prompt + k * rounds + r, cfg.max_tokens)
                 for r in range(rounds)]
                for k in range(c)
            ]  # fmt: skip
            next_prompt += c * rounds
            levels.append(await run_level(client, bodies, c, cfg.max_tokens))
            print(f"  c={c}: {levels[-1].tok_s:.1f} tok/s", flush=True)
    return levels


def run_server(cfg: BenchConfig, prompts: PromptSet) -> list[LevelResult]:
    if cfg.server_url:
        return asyncio.run(drive_server(cfg, cfg.server_url.rstrip("/"), prompts))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as tmp:
        # The same batch limit whatever levels run, so a subset run measures the same server.
        max_batch = max(RAW_BATCH, *cfg.concurrency)
        args = serve_command(cfg.model_dir, port, max_batch, list(cfg.server_args))
        log_path = Path(tmp) / "server.log"
        server = ServerProcess(args=args, log_path=log_path, env=thread_env(cfg.threads))
        server.start()
        try:
            base_url = f"http://127.0.0.1:{port}"
            server.wait_healthy(base_url, cfg.health_timeout_s)  # its errors carry the log
            return _drive_with_log(cfg, base_url, prompts, server)
        finally:
            server.stop()


def _drive_with_log(
    cfg: BenchConfig, base_url: str, prompts: PromptSet, server: ServerProcess
) -> list[LevelResult]:
    try:
        return asyncio.run(drive_server(cfg, base_url, prompts))
    except Exception:
        # A failed request says little on its own; the server's traceback is in its log.
        print(f"server log tail:\n{server.log_tail()}")
        raise


# --------------------------------------------------------------------------- report


def compute_ratios(report: Report) -> list[Ratio]:
    by_c = {level.concurrency: level for level in report.server}
    pairs = [
        ("server c=1 / HF generate", by_c.get(1), report.hf_generate, TARGET_SINGLE),
        ("server c=32 / HF raw B=32 decode", by_c.get(32), report.hf_raw_decode_b32, TARGET_BATCH),
    ]
    ratios = []
    for name, level, base, target in pairs:
        value = level.tok_s / base.tok_s if level and base else None
        ratios.append(Ratio(name, value, target, value is not None and value >= target))
    return ratios


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
        rows.append((f"server, {streams}{note}", f"{lv.tok_s:.1f}",
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
            print(f"{row[0]:<40}{row[1]:>10}{row[2]:>14}{row[3]:>14}")
    else:
        table = Table(title="genserve throughput", caption=_settings_line(report))
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in table_rows(report):
            table.add_row(*row)
        Console().print(table)
    for line in ratio_lines(report):
        print(line)


def _settings_line(report: Report) -> str:
    s = report.settings
    return f"prompt {s['prompt_tokens']} tokens, {s['max_tokens']} new tokens, fp32, CPU"


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
    needed = 1 + sum(c * r for c, r in zip(cfg.concurrency, cfg.rounds, strict=True))
    prompts = build_prompts(tokenizer, max(needed, RAW_BATCH), cfg.prompt_tokens)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("api_key",)}
    report = Report(settings=json.loads(json.dumps(settings, default=str)))
    if cfg.baselines:
        print("transformers baselines ...", flush=True)
        report.hf_generate, report.hf_raw_decode_b32 = run_baselines(cfg, prompts)
    if cfg.server:
        print("server ...", flush=True)
        report.server = run_server(cfg, prompts)
    report.ratios = compute_ratios(report)
    print_report(report)
    print(f"total {time.perf_counter() - started:.0f} s")
    if cfg.json_path:
        cfg.json_path.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
