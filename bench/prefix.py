"""What automatic prefix caching saves, measured in one run on one machine (issue 16).

    python bench/prefix.py
    python bench/prefix.py --model-dir var/bench-models/smollm2-135m-random --threads 2

On the SmolLM2-135M-shaped random model (built once under var/bench-models/, as
bench/throughput.py does), against a live server with prefix caching on, it prints:

1. time to first token (TTFT) of a 1,500-token system prompt + a short question, cold, then
   warm with other questions, and the cached_tokens the server reported;
2. chats whose history grows 60 tokens a turn: TTFT of each of 6 turns, the median over 5
   chats (6th / 1st);
3. 16 concurrent requests sharing a new system prompt (never seen before, so the first one
   computes it): p50 TTFT, then the same against a server started with --no-prefix-caching;
4. decode speed of --streams streams whose prompts share a cached system prompt against as
   many whose prompts share nothing, rounds alternating (each stream's tokens after its
   first over the time they took, so the prefill each side saved or paid is left out).

Requests sample as clients do (temperature 0.8, top_p 0.95). A request asks for one token, so
its latency is its TTFT (prefill plus one sampled token, no stream parsing). Prompts go to
/v1/completions as text (the random model has no chat template); every word is one or a few
tokens, so a prompt is an exact number of tokens and a prefix of text is a prefix of tokens.
Targets (issue 16): warm <= 0.2x cold; 6th turn <= 1.2x 1st; 16 concurrent p50 <= 0.5x;
and a shared prompt must not slow the decodes that follow it: >= 0.95x (a prefix read from
another slot's blocks once kept every step holding it off decode.c's path).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
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
    percentile,
    serve_command,
    streamed_decode_rate,
    thread_env,
)

SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 1}
MODEL = "smollm2-135m-random"
TARGET_WARM, TARGET_TURN, TARGET_CONCURRENT = 0.2, 1.2, 0.5
TARGET_SHARED_DECODE = 0.95
DECODE_TOKENS = 128


@dataclass(frozen=True, slots=True)
class Timed:
    seconds: float
    cached_tokens: int
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Texts:
    system: str  # the system prompt of parts 1 (and, fresh, 3)
    fresh_system: str
    questions: list[str]
    chats: list[list[str]]  # per chat, what each turn adds to its history


async def timed(http: httpx.AsyncClient, prompt: str) -> Timed:
    start = time.perf_counter()
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **SAMPLING})
    seconds = time.perf_counter() - start
    r.raise_for_status()
    usage = r.json()["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Timed(seconds, cached, usage["prompt_tokens"])


async def system_prompt_part(http: httpx.AsyncClient, t: Texts) -> list[str]:
    cold = await timed(http, t.system + t.questions[0])
    warm = [await timed(http, t.system + q) for q in t.questions[1:6]]
    warm_s = percentile([w.seconds for w in warm], 50)
    return [
        f"1,500-token system prompt: cold TTFT {cold.seconds * 1000:.0f} ms "
        f"({cold.prompt_tokens} prompt tokens, {cold.cached_tokens} cached)",
        f"  warm TTFT p50 {warm_s * 1000:.0f} ms over {len(warm)} other questions "
        f"(cached_tokens {sorted({w.cached_tokens for w in warm})})",
        verdict("warm / cold", warm_s / cold.seconds, TARGET_WARM),
    ]


async def chat_part(http: httpx.AsyncClient, t: Texts) -> list[str]:
    """Several chats one after the other (distinct histories), each turn's TTFT the median
    over the chats: one request's latency moves by tens of ms on a 2-core machine."""
    per_chat = []
    for turns in t.chats:
        history, times = "", []
        for turn in turns:
            history += turn
            times.append(await timed(http, history))
        per_chat.append(times)
    by_turn = [percentile([c[i].seconds for c in per_chat], 50) for i in range(len(per_chat[0]))]
    cached = [per_chat[0][i].cached_tokens for i in range(len(by_turn))]
    pairs = zip(by_turn, cached, strict=True)
    shown = ", ".join(f"{s * 1000:.0f} ms ({c} cached)" for s, c in pairs)
    return [
        f"{len(per_chat)} chats growing {len(by_turn)} turns: TTFT p50 per turn {shown}",
        verdict(f"turn {len(by_turn)} / turn 1", by_turn[-1] / by_turn[0], TARGET_TURN),
    ]


async def concurrent_part(http: httpx.AsyncClient, t: Texts, n: int) -> float:
    jobs = [timed(http, t.fresh_system + t.questions[i % len(t.questions)]) for i in range(n)]
    results = await asyncio.gather(*jobs)
    return percentile([r.seconds for r in results], 50)


async def decode_rate(http: httpx.AsyncClient, prompt: str) -> float:
    """One streamed request's tokens after its first, per second of the time they took."""
    body = {"model": MODEL, "prompt": prompt, **SAMPLING, "max_tokens": DECODE_TOKENS,
            "ignore_eos": True, "stream": True}  # fmt: skip
    return await streamed_decode_rate(http, body)


async def shared_decode_part(
    http: httpx.AsyncClient, t: Texts, streams: int, rounds: int
) -> list[str]:
    """Per-stream decode speed, prompts sharing a cached system prompt against prompts of
    the same length sharing nothing (each round's prompts new, so nothing else is cached)."""
    rates: dict[str, list[float]] = {"shared": [], "unshared": []}
    for k in range(rounds):
        for kind in ("shared", "unshared") if k % 2 == 0 else ("unshared", "shared"):
            n = len(t.questions)
            ask = [t.questions[(k * streams + i) % n] + f" {k} {i}" for i in range(streams)]
            if kind == "shared":
                await timed(http, t.fresh_system + "warm")  # cached, held by no stream
                prompts = [t.fresh_system + q for q in ask]
            else:  # the system prompt's words rotated per stream and round: no common prefix
                words = t.fresh_system.split(" ")
                turn = [" ".join(words[i + 1 :] + words[: i + 1]) for i in range(streams)]
                pairs = enumerate(zip(turn, ask, strict=True))
                prompts = [f"{k} {i} {w}{q}" for i, (w, q) in pairs]
            got = await asyncio.gather(*(decode_rate(http, p) for p in prompts))
            rates[kind].append(sum(got) / len(got))
    shared, unshared = (percentile(rates[k], 50) for k in ("shared", "unshared"))
    return [
        f"{streams} streams decoding {DECODE_TOKENS} tokens: {shared:.1f} tok/s each when their "
        f"prompts share a cached system prompt, {unshared:.1f} when they share nothing "
        f"(rounds: {', '.join(f'{r:.0f}' for r in rates['shared'])} / "
        f"{', '.join(f'{r:.0f}' for r in rates['unshared'])})",
        verdict_at_least("shared / unshared", shared / unshared, TARGET_SHARED_DECODE),
    ]


def verdict_at_least(name: str, value: float, target: float) -> str:
    ok = "meets" if value >= target else "MISSES"
    return f"  {name}: {value:.2f}x ({ok} the target >= {target}x)"


def verdict(name: str, value: float, target: float) -> str:
    ok = "meets" if value <= target else "MISSES"
    return f"  {name}: {value:.2f}x ({ok} the target <= {target}x)"


def make_texts(
    model_dir: Path, system_tokens: int, turn_tokens: int, turns: int, chats: int
) -> Texts:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    systems = build_prompts(tok, 2, system_tokens, seed=16).texts
    questions = build_prompts(tok, 16, 20, seed=17).texts
    histories = [build_prompts(tok, turns, turn_tokens, seed=18 + i).texts for i in range(chats)]
    return Texts(systems[0], systems[1], questions, histories)


def run_server(args: argparse.Namespace, extra: list[str], drive) -> object:  # noqa: ANN001
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="genserve-prefix-") as tmp:
        cmd = serve_command(args.model_dir, port, args.concurrency, [
            "--served-model-name", MODEL, "--embedding-model", "none", "--data-dir", tmp, *extra,
        ])  # fmt: skip
        server = ServerProcess(cmd, Path(tmp) / "server.log", thread_env(args.threads))
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            server.wait_healthy(url, 600)

            async def go() -> object:
                async with httpx.AsyncClient(base_url=url, timeout=600) as http:
                    await timed(http, "warm up the kernels")
                    return await drive(http)

            return asyncio.run(go())
        except Exception:
            print(server.log_tail())
            raise
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--threads", type=int, default=None, help="server intra-op threads")
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--turn-tokens", type=int, default=60)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--chats", type=int, default=5, help="chats whose per-turn TTFT is the median")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--streams", type=int, default=4, help="decoding streams of part 4")
    p.add_argument("--decode-rounds", type=int, default=4, help="rounds of part 4, each side")
    p.add_argument("--decode-only", action="store_true", help="part 4 only")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if note := busy_warning():
        print(note)
    ensure_model_dir(args.model_dir, ModelSpec())
    t = make_texts(args.model_dir, args.system_tokens, args.turn_tokens, args.turns, args.chats)

    def decoding(http: httpx.AsyncClient):  # noqa: ANN202 - a coroutine
        return shared_decode_part(http, t, args.streams, args.decode_rounds)

    if args.decode_only:
        print("\n".join(run_server(args, [], decoding)), flush=True)  # type: ignore[arg-type]
        return

    async def with_cache(http: httpx.AsyncClient) -> tuple[list[str], float]:
        lines = await system_prompt_part(http, t)
        lines += await chat_part(http, t)
        return lines, await concurrent_part(http, t, args.concurrency)

    lines, cached_p50 = run_server(args, [], with_cache)
    print("\n".join(lines), flush=True)
    plain_p50 = run_server(
        args, ["--no-prefix-caching"], lambda http: concurrent_part(http, t, args.concurrency)
    )
    print(f"{args.concurrency} concurrent requests sharing a new {args.system_tokens}-token "
          f"system prompt: TTFT p50 {cached_p50 * 1000:.0f} ms with prefix caching, "
          f"{plain_p50 * 1000:.0f} ms without")  # fmt: skip
    print(verdict("with / without", cached_p50 / plain_p50, TARGET_CONCURRENT))
    print("\n".join(run_server(args, [], decoding)), flush=True)  # type: ignore[arg-type]
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
