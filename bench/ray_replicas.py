"""Aggregate throughput of `genserve serve --ray` with 1 and 2 engine replicas.

    python bench/ray_replicas.py                 # SmolLM2-135M-shaped model, plain, 1, 2
    python bench/ray_replicas.py --layers 6      # a shallower model of the same width: quicker
    python bench/ray_replicas.py --replicas 1,2,4 --clients 32 --no-plain

Each setting starts its own server (a local Ray for the --ray ones, as the CLI does), warms it
up, then runs --clients streaming clients at once, each sending --rounds requests of exactly
--max-tokens tokens (EOS ignored). Printed: aggregate tokens/s per setting and the ratio of
each to 1 replica. On Ray each engine replica reserves one CPU (a share of it when the machine
has fewer CPUs than replicas), and Ray runs its torch with that many threads; the plain server
uses every core. On a 2-core machine little gain is expected: this proves the wiring. On a
cluster, replicas land on other machines and the gain approaches the replica count while the
edge keeps up (see the README, "Scaling out with Ray Serve").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
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
)
from throughput import run_level

REPLICA = "x-genserve-replica"


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    replicas: int | None  # None: plain `genserve serve`, no Ray


@dataclass(frozen=True, slots=True)
class Result:
    setting: str
    replicas: int | None
    requests: int
    completion_tokens: int
    wall_s: float
    tok_s: float
    ttft_p50_ms: float
    replicas_seen: int  # distinct x-genserve-replica values in the warm-up (0: plain)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", default="1,2", help="engine replica counts to compare")
    p.add_argument("--no-plain", action="store_true", help="skip the plain (no Ray) server")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=None, help="build a shallower model")
    p.add_argument("--health-timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def model_dir(layers: int | None) -> Path:
    if layers is None:
        return ensure_model_dir(DEFAULT_MODEL_DIR, ModelSpec())
    folder = DEFAULT_MODEL_DIR.with_name(f"{DEFAULT_MODEL_DIR.name}-{layers}l")
    return ensure_model_dir(folder, ModelSpec(num_hidden_layers=layers))


def settings(args: argparse.Namespace) -> list[Setting]:
    out = [] if args.no_plain else [Setting("plain", None)]
    for n in (int(x) for x in args.replicas.split(",")):
        out.append(Setting(f"ray x{n}", n))
    return out


def server_args(folder: Path, port: int, setting: Setting, clients: int, data: Path) -> list[str]:
    extra = ["--data-dir", str(data), "--log-level", "warning"]
    if setting.replicas is not None:
        extra += ["--ray", "--replicas", str(setting.replicas)]
    return serve_command(folder, port, clients, extra)


def bodies(prompts: list[str], clients: int, rounds: int, max_tokens: int) -> list[list[dict]]:
    def body(i: int) -> dict:
        return {
            "model": "bench", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }  # fmt: skip

    return [[body(k * rounds + r) for r in range(rounds)] for k in range(clients)]


async def replicas_seen(client: httpx.AsyncClient, model: str, count: int) -> set[str]:
    """Short requests at once; the engine replicas that answered them."""
    body = {"model": model, "prompt": "warm up", "max_tokens": 4}
    replies = await asyncio.gather(
        *(client.post("/v1/completions", json=body) for _ in range(count))
    )
    for r in replies:
        r.raise_for_status()
    return {r.headers[REPLICA] for r in replies if REPLICA in r.headers}


async def warm_up(client: httpx.AsyncClient, model: str, setting: Setting, clients: int) -> int:
    """/health is 200 once one replica is up; wait until every replica answers (and is warm)."""
    want = setting.replicas or 0
    seen: set[str] = set()
    for _ in range(120):
        seen |= await replicas_seen(client, model, 2 * clients)
        if len(seen) >= want:
            return len(seen)
        await asyncio.sleep(1.0)
    raise TimeoutError(f"only {len(seen)} of {want} replicas answered")


async def drive(url: str, setting: Setting, args: argparse.Namespace, prompts: list[str]) -> Result:
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=600.0, trust_env=False
    ) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        seen = await warm_up(client, model, setting, args.clients)
        work = bodies(prompts, args.clients, args.rounds, args.max_tokens)
        for mine in work:
            for body in mine:
                body["model"] = model
        level = await run_level(client, work, args.clients, args.max_tokens)
    return Result(
        setting.name, setting.replicas, level.requests, level.completion_tokens, level.wall_s,
        level.tok_s, level.ttft_p50_ms, seen,
    )  # fmt: skip


def run_setting(folder: Path, setting: Setting, args: argparse.Namespace, prompts: list[str]):  # noqa: ANN201
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="genserve-bench-ray-") as tmp:
        cmd = server_args(folder, port, setting, args.clients, Path(tmp) / "data")
        server = ServerProcess(args=cmd, log_path=Path(tmp) / "server.log")
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            server.wait_healthy(url, args.health_timeout)
            return asyncio.run(drive(url, setting, args, prompts))
        except Exception:
            print(f"server log tail:\n{server.log_tail()}")
            raise
        finally:
            server.stop(grace_s=60)


def print_report(results: list[Result]) -> None:
    base = next((r.tok_s for r in results if r.replicas == 1), None)
    print(f"\n{'setting':10s} {'tok/s':>8s} {'vs x1':>6s} {'ttft p50':>9s} {'replicas':>9s}")
    for r in results:
        ratio = f"{r.tok_s / base:.2f}" if base else "-"
        seen = str(r.replicas_seen) if r.replicas is not None else "-"
        print(f"{r.setting:10s} {r.tok_s:8.1f} {ratio:>6s} {r.ttft_p50_ms:7.0f}ms {seen:>9s}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = model_dir(args.layers)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    count = args.clients * args.rounds
    prompts = build_prompts(tokenizer, count, args.prompt_tokens).texts
    warning = busy_warning()
    if warning:
        print(warning)
    results = []
    for setting in settings(args):
        print(f"{setting.name}: starting", flush=True)
        results.append(run_setting(folder, setting, args, prompts))
        print(f"{setting.name}: {results[-1].tok_s:.1f} tok/s", flush=True)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
