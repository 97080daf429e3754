"""What the guarantees cost, each as a ratio measured in the same run at 32 streams.

    python bench/costs.py [--streams 32] [--prompt-tokens 64] [--max-tokens 64]

On the SmolLM2-135M-shaped random model (see throughput.py):
- batch invariance: a server started with --deterministic against the default (plain) one,
  and seeded requests (batch-invariant on any server) against unseeded ones;
- grammar masks: json_schema-constrained requests against free ones, same server;
- LoRA: mixed traffic (base + 3 adapters, a quarter each) against base-only traffic
  (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    DEFAULT_MODEL_DIR,
    ModelSpec,
    ServerProcess,
    build_prompts,
    busy_warning,
    ensure_model_dir,
    free_port,
    serve_command,
    thread_env,
)
from throughput import LevelResult, run_level

# Long enough (at least 64 numbers) that constrained requests also stop at max_tokens, so
# both sides generate the same number of tokens and the ratio is the masks' cost alone.
SCHEMA = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "minItems": 64,
            "maxItems": 64,
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
        }
    },
    "required": ["values"],
    "additionalProperties": False,
}
ADAPTERS = ("ft:bench:a0:x", "ft:bench:a1:x", "ft:bench:a2:x")


@dataclass(frozen=True, slots=True)
class Settings:
    streams: int
    prompt_tokens: int
    max_tokens: int
    model_dir: Path
    threads: int | None = None


def make_adapters(model_dir: Path, root: Path) -> list[str]:
    """Three random LoRA adapters (r=8, all projections) for the bench model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    args = []
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(root / f"a{i}", safe_serialization=True)
        args += ["--lora-modules", f"{name}={root / f'a{i}'}"]
    return args


def body(s: Settings, prompt: str, model: str, grammar: bool, seed: int | None = None) -> dict:
    b = {
        "model": model, "prompt": prompt, "max_tokens": s.max_tokens, "temperature": 1.0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": not grammar,
    }  # fmt: skip
    if seed is not None:  # a seeded request takes the batch-invariant path
        b["seed"] = seed
    if grammar:
        b["response_format"] = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    return b


async def level(url: str, bodies: list[dict], s: Settings) -> LevelResult:
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        await run_level(client, [[b] for b in bodies[:2]], 2, s.max_tokens)  # warm-up
        return await run_level(client, [[b] for b in bodies], s.streams, s.max_tokens)


def with_server(s: Settings, extra: list[str], runs) -> list[LevelResult]:  # noqa: ANN001
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = serve_command(s.model_dir, port, s.streams, extra)
        server = ServerProcess(
            args=args, log_path=Path(tmp) / "server.log", env=thread_env(s.threads)
        )
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            server.wait_healthy(url, 300)
            return [asyncio.run(level(url, bodies, s)) for bodies in runs]
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch threads in the servers")
    a = p.parse_args()
    s = Settings(a.streams, a.prompt_tokens, a.max_tokens, DEFAULT_MODEL_DIR, a.threads)
    if warning := busy_warning():
        print(warning)
    ensure_model_dir(s.model_dir, ModelSpec())
    from transformers import AutoTokenizer

    prompts = build_prompts(
        AutoTokenizer.from_pretrained(s.model_dir), 4 * s.streams, s.prompt_tokens
    )
    texts = prompts.texts
    base = "smollm2-135m-random"
    free = [body(s, t, base, False) for t in texts[: s.streams]]
    seeded = [body(s, t, base, False, seed=i) for i, t in enumerate(texts[3 * s.streams :])]
    constrained = [body(s, t, base, True) for t in texts[s.streams : 2 * s.streams]]
    models = [base, *ADAPTERS]
    mixed = [
        body(s, t, models[i % 4], False) for i, t in enumerate(texts[2 * s.streams : 3 * s.streams])
    ]
    (invariant,) = with_server(s, ["--deterministic"], [free])
    with tempfile.TemporaryDirectory() as tmp:
        adapter_args = make_adapters(s.model_dir, Path(tmp))
        runs = [free, seeded, constrained, mixed]
        plain, seeded_run, grammar, lora = with_server(s, adapter_args, runs)
    report(s, plain, invariant, seeded_run, grammar, lora)


def report(s: Settings, plain, invariant, seeded, grammar, lora) -> None:  # noqa: ANN001
    print(f"{s.streams} streams, prompt {s.prompt_tokens} tokens, up to {s.max_tokens} new, fp32")
    rows = [
        ("plain path (default, no seeds)", plain),
        ("batch-invariant (--deterministic)", invariant),
        ("seeded requests (default)", seeded),
        ("json_schema grammar (default)", grammar),
        ("base + 3 adapters (default)", lora),
    ]
    for name, r in rows:
        per = r.completion_tokens / max(r.requests, 1)
        print(f"  {name:36s} {r.tok_s:7.1f} tok/s  {per:5.1f} tok/request  "
              f"TTFT p50 {r.ttft_p50_ms:6.0f} ms")  # fmt: skip
    print(f"batch invariance: {invariant.tok_s / plain.tok_s:.2f}x the plain path")
    print(f"seeded requests:  {seeded.tok_s / plain.tok_s:.2f}x unseeded ones")
    print(f"grammar masks:    {grammar.tok_s / plain.tok_s:.2f}x free requests")
    ratio = lora.tok_s / plain.tok_s
    verdict = "met" if ratio >= 0.8 else "NOT met"
    print(f"mixed adapters:   {ratio:.2f}x base-only (goal >= 0.8: {verdict})")


if __name__ == "__main__":
    main()
