"""Aggregate tok/s of 1 stream vs 8 concurrent streams on the live server, per model family.

    python bench/families.py                       # qwen3 and llama (the LlamaRunner reference)
    python bench/families.py --families qwen3 gemma3_text mistral --max-tokens 64
    python bench/families.py --families llama llama:generic   # Llama on both runners
    python bench/families.py --families qwen3 --build-135m var/bench-models/qwen3-135m-random
        # only builds a SmolLM2-135M-shaped model of the family, for bench/throughput.py

Each family is a small random model built from tests/tiny_families.py's config at a larger
shape (--hidden, --layers), served by `genserve serve` in a child process, driven over HTTP as
clients do. Requests are unseeded (--seeded: each has a seed, so the batch-invariant path),
sample at temperature 1 and ignore EOS, so every request generates exactly --max-tokens tokens. Both
levels of one family run against the same server in the same run; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    REPO_ROOT,
    ModelSpec,
    ServerProcess,
    _build_tokenizer,
    build_prompts,
    busy_warning,
    free_port,
    serve_command,
    thread_env,
)

sys.path.insert(0, str(REPO_ROOT))
from tests.tiny_families import family_config  # noqa: E402

STREAMS = 8
VOCAB = 2048


@dataclass(frozen=True, slots=True)
class Level:
    streams: int
    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def build_model(folder: Path, family: str, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    shape = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 3,
                 num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, head_dim=32,
                 vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    if family == "gpt_neox":
        shape.pop("num_key_value_heads")
        shape.pop("head_dim")
    cfg = family_config(family, **shape) if family != "llama" else None
    if cfg is None:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    _build_tokenizer(VOCAB).save_pretrained(str(folder))
    return folder


def build_135m(folder: Path, family: str) -> Path:
    """The family at SmolLM2-135M's shape (bench/common.py's ModelSpec), random fp32 weights,
    with the benchmark tokenizer: what bench/throughput.py --model-dir takes."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = ModelSpec()
    shape = dict(hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
                 num_attention_heads=spec.num_attention_heads, head_dim=64,
                 num_key_value_heads=spec.num_key_value_heads, vocab_size=spec.vocab_size,
                 intermediate_size=spec.intermediate_size, max_position_embeddings=2048,
                 tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
                 eos_token_id=0)  # fmt: skip
    torch.manual_seed(spec.seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_config(family_config(family, **shape))
    model.save_pretrained(folder, safe_serialization=True)
    _build_tokenizer(spec.vocab_size).save_pretrained(str(folder))
    return folder


async def one(
    http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int | None = None
) -> int:
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                ignore_eos=True, seed=seed)  # fmt: skip
    r = await http.post("/v1/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def level(
    url: str, model: str, prompts: list[str], streams: int, max_tokens: int, seeded: bool
) -> Level:
    """`streams` clients at once, each sending its share of the prompts one after another
    (seeded: each request with its own seed, on the batch-invariant path)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one(http, model, prompts[0], 4)  # warm-up, not timed

        async def client(mine: list[str], first: int) -> int:
            seeds = [first + k if seeded else None for k in range(len(mine))]
            pairs = zip(mine, seeds, strict=True)
            return sum([await one(http, model, p, max_tokens, s) for p, s in pairs])

        start = time.perf_counter()
        mine = [prompts[i::streams] for i in range(streams)]
        counts = await asyncio.gather(*(client(m, 100 * i) for i, m in enumerate(mine)))
        return Level(streams, sum(counts), time.perf_counter() - start)


def run_family(name: str, args: argparse.Namespace, work: Path) -> tuple[Level, Level, str]:
    """`family` or `family:generic` (--no-fast-path: a Llama on BatchedHFRunner)."""
    family, _, variant = name.partition(":")
    folder = build_model(work / f"bench-{family}-{variant}", family, args.hidden, args.layers)
    port = free_port()
    extra = ["--max-model-len", "512", "--embedding-model", "none"]
    extra += ["--data-dir", str(work / f"data-{port}")]
    extra += ["--no-fast-path"] if variant == "generic" else []
    env = thread_env(args.threads)
    log_path = work / f"{family}-{variant}.log"
    server = ServerProcess(serve_command(folder, port, STREAMS, extra), log_path, env)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_healthy(url, 300)
        tok = _build_tokenizer(VOCAB)
        prompts = build_prompts(tok, 2 * STREAMS, args.prompt_tokens).texts  # 16
        single, many = [], []
        for _ in range(args.rounds):  # alternated, best of each: other load comes and goes
            single.append(
                asyncio.run(level(url, folder.name, prompts[:4], 1, args.max_tokens, args.seeded))
            )
            many.append(
                asyncio.run(level(url, folder.name, prompts, STREAMS, args.max_tokens, args.seeded))
            )
    finally:
        server.stop()
    lines = server.log_path.read_text().splitlines()
    runner = next((ln.split("model type ", 1)[1] for ln in lines if "Runner" in ln), "?")
    return max(single, key=lambda x: x.rate), max(many, key=lambda x: x.rate), runner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", nargs="+", default=["qwen3", "llama"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seeded", action="store_true", help="every request seeded (invariant path)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="server's OMP/MKL threads")
    p.add_argument("--build-135m", type=Path, help="only build the first family here, 135M")
    args = p.parse_args()
    if args.build_135m:
        print(f"built {build_135m(args.build_135m, args.families[0])}")
        return 0
    threads = args.threads or "default"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; server threads {threads}")  # fmt: skip
    if note := busy_warning():
        print(note)
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}, fp32; "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} tokens each; "
          f"1 stream: 4 requests in a row, 8 streams: 16; best of {args.rounds}"
          f"{'; seeded requests' if args.seeded else ''}")  # fmt: skip
    print(f"{'family':<14} {'1 stream tok/s':>15} {'8 streams tok/s':>16} {'ratio':>6}  runner")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            single, many, runner = run_family(family, args, Path(tmp))
            ratio = many.rate / single.rate
            print(f"{family:<14} {single.rate:>15.1f} {many.rate:>16.1f} {ratio:>6.2f}  {runner}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
