"""Overload on loopback: N x the engine's batch capacity, only 200s and 429s, memory back.

    python bench/load.py [--multiple 4] [--batch 8] [--waves 5] [--max-tokens 64]

Starts a server on the bundled starter model with --max-batch-size BATCH and a small queue,
sends waves of MULTIPLE x BATCH concurrent requests with httpx (no retries: every status is
counted), then one more wave through the official openai client with retries on, and prints
the status counts, 429s without Retry-After, the client's success rate, and the server's RSS
before and after (goal: within 10%).

Hostile mode (issue 13): one tenant's requests must not hurt another's.

    python bench/load.py --hostile [--streams 32] [--max-tokens 64] [--slowloris 300]
        [--best-of-requests 4] [--only KIND ...] [--timeout 120] [--settle 5] [--batch STREAMS+96]

Starts a server on the starter model with two API keys, A and B (GENSERVE_API_KEYS), room for
the streams and the attackers' sequences (--max-batch-size STREAMS+96) and --max-file-bytes
1 MiB. A uploads one file. Baseline phase: STREAMS streaming completions with key A
(temperature 0.8, top_p 0.95, MAX_TOKENS with ignore_eos), each one's TTFT and whether all its
tokens came; then the server's RSS. Hostile phase: SLOWLORIS half-sent requests are opened and
held (a header byte every 5 s), then the same streams start together with key B's requests of
bench/hostile.py: top_k 10**30, an unmatchable regex schema, logit_bias of 8,192 entries with
n=16, four 20-40k-character stop strings, a 3.9 MB prompt, a 12-deep anyOf schema,
BEST_OF_REQUESTS x best_of 16, a lone surrogate, a 100k-deep JSON body, a 24 MiB chunked upload,
B's reads of A's file, and /health. The two poisons (top_k, regex) are sent again "mid-stream",
once half the streams have their first token, so that they share engine steps with them
whatever the other attacks did to the streams' start. The sockets are dropped, RSS read again
after SETTLE seconds, and last, B's DELETE of the base model (a member key must not unload it;
sent last so that, where it succeeds, it cannot pass for an engine failure of anything else).

Prints the machine and its load, streams completed in each phase, TTFT p50 of both and their
ratio (goal <= 2x), RSS before and after (goal within +10%), and per kind of hostile request its
status codes, error code and slowest time. Exits 1 naming each goal missed: a normal stream
that failed, the ratio, the RSS, a 5xx, a hang (no answer within TIMEOUT) or no answer from a
hostile request, a cross-key read or model delete that succeeded, the server exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
from common import ServerProcess, free_port, percentile, started_fully, tree_rss
from hostile import (
    MIB,
    MODEL,
    Attack,
    Outcome,
    Upload,
    attacks,
    chunked_upload,
    close_slowloris,
    cross_key_reads,
    error_code,
    health_probe,
    member_delete,
    open_slowloris,
    poisons,
    send_attack,
    trickle,
    upload_as,
    when,
)


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
    a = parse_args()
    if a.hostile:
        sys.exit(hostile_main(a))
    a.batch = a.batch or 8
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--multiple", type=int, default=4)
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="--max-batch-size (default: 8; with --hostile, streams + 96)",
    )
    p.add_argument("--waves", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--hostile",
        action="store_true",
        help="normal streams beside hostile requests (issue 13), see above",
    )
    p.add_argument("--streams", type=int, default=32, help="--hostile: normal streams")
    p.add_argument("--slowloris", type=int, default=300, help="--hostile: half-open sockets")
    p.add_argument(
        "--best-of-requests", type=int, default=4, help="--hostile: requests with best_of 16"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="--hostile: send only the JSON attacks whose kind contains this (repeatable), "
        "to find which one costs the streams their TTFT",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="--hostile: seconds a request may take before it counts as a hang",
    )
    p.add_argument(
        "--settle", type=float, default=5.0, help="--hostile: seconds before each RSS reading"
    )
    return p.parse_args()


def run(url: str, proc: psutil.Process, a: argparse.Namespace) -> None:
    n = a.multiple * a.batch
    asyncio.run(wave(url, a.batch, a.max_tokens))  # warm-up
    before = tree_rss(proc)
    codes: collections.Counter[int] = collections.Counter()
    missing_retry_after = 0
    for _ in range(a.waves):
        for r in asyncio.run(wave(url, n, a.max_tokens)):
            codes[r.status_code] += 1
            missing_retry_after += r.status_code == 429 and "retry-after" not in r.headers
    ok = asyncio.run(retried(url, n, a.max_tokens))
    after = tree_rss(proc)
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


# --hostile: normal streams of key A beside the hostile requests of key B (bench/hostile.py).

KEY_A, KEY_B = "sk-bench-tenant-a", "sk-bench-tenant-b"
UPLOAD_LIMIT = MIB  # the server's --max-file-bytes; the chunked upload sends 24 times that
TTFT_GOAL = 2.0
RSS_GOAL = 0.10


@dataclass(slots=True)
class StreamResult:
    ttft: float | None = None
    tokens: int = 0  # from the usage frame
    frames: int = 0  # token frames seen, for a stream that never ends
    done: bool = False
    error: str = ""

    def completed(self, max_tokens: int) -> bool:
        return self.done and not self.error and self.tokens == max_tokens


@dataclass(slots=True)
class Started:
    """Set once `wanted` streams have their first token: the mid-stream poisons wait for it."""

    wanted: int
    count: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.wanted:
            self.event.set()


@dataclass(slots=True)
class HostileRun:
    """Filled in as the run goes, so a run cut short still reports what it measured."""

    baseline: list[StreamResult] = field(default_factory=list)
    hostile: list[StreamResult] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    rss_before: int | None = None
    rss_after: int | None = None
    server_exit: int | None = None
    broken: str = ""  # an exception that ended the run early


def hostile_main(a: argparse.Namespace) -> int:
    a.batch = a.batch or a.streams + 96
    load_before = os.getloadavg()[0]
    run = HostileRun()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GENSERVE_API_KEYS": f"{KEY_A},{KEY_B}"}
        server = ServerProcess(hostile_server_args(tmp, a), Path(tmp) / "server.log", env)
        server.start()
        try:
            server.wait_healthy(f"http://127.0.0.1:{a.port}", 300)
            asyncio.run(hostile_run(server, a, run))
        except Exception as e:  # noqa: BLE001 - report what was measured, then why it stopped
            run.broken = f"{type(e).__name__}: {e}"
        finally:
            run.server_exit = server.proc.poll() if server.proc else None
            if run.server_exit is not None or run.broken:
                print(f"server log tail:\n{server.log_tail(2000)}\n")
            server.stop()
    print_hostile(run, a, load_before)
    return report_goals(run, a)


def hostile_server_args(tmp: str, a: argparse.Namespace) -> list[str]:
    a.port = free_port()
    return [sys.executable, "-m", "genserve.cli", "serve", "--port", str(a.port),
            "--max-batch-size", str(a.batch), "--data-dir", tmp, "--embedding-model", "none",
            "--max-file-bytes", str(UPLOAD_LIMIT)]  # fmt: skip


def client(a: argparse.Namespace, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{a.port}",
        headers={"authorization": f"Bearer {key}"},
        timeout=a.timeout,
        limits=httpx.Limits(max_connections=None),
        trust_env=False,
    )


async def hostile_run(server: ServerProcess, a: argparse.Namespace, run: HostileRun) -> None:
    proc = psutil.Process(server.proc.pid)
    hostile_requests = chosen(attacks(a.best_of_requests), a.only)  # built before timing
    async with client(a, KEY_A) as http_a, client(a, KEY_B) as http_b:
        await wait_started(http_a)
        await normal_phase(http_a, min(4, a.streams), a)  # warm-up
        file_id = await upload_as(http_a, "tenant-a.jsonl")
        run.baseline = await normal_phase(http_a, a.streams, a)
        run.rss_before = await settled_rss(proc, a.settle)
        await hostile_phase(http_a, http_b, file_id, hostile_requests, a, run)
        run.rss_after = await settled_rss(proc, a.settle)
        # Last, after every measurement: today it unloads the base model for everyone.
        run.outcomes.append(await member_delete(http_b, a.timeout))


async def wait_started(http: httpx.AsyncClient, timeout_s: float = 120) -> None:
    """Until every model's grammar helper has loaded: its start must fall in neither phase."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if started_fully((await http.get("/health")).json()):
            return
        await asyncio.sleep(0.2)


def chosen(listed: list[Attack], only: list[str]) -> list[Attack]:
    return [r for r in listed if not only or any(o in r.kind for o in only)]


async def settled_rss(proc: psutil.Process, settle_s: float) -> int | None:
    await asyncio.sleep(settle_s)
    try:
        return tree_rss(proc)
    except psutil.Error:
        return None


async def normal_phase(http: httpx.AsyncClient, n: int, a, started: Started | None = None):
    return list(await asyncio.gather(*[normal_stream(http, i, a, started) for i in range(n)]))


async def hostile_phase(http_a, http_b, file_id, hostile_requests, a, run: HostileRun) -> None:
    loris = await open_slowloris(a.port, a.slowloris)
    trickler = asyncio.create_task(trickle(loris))
    start = time.perf_counter()
    try:
        upload = Upload(KEY_B, 24 * UPLOAD_LIMIT)
        sends = [send_attack(http_b, r, a.timeout) for r in hostile_requests]
        sends += [chunked_upload(a.port, upload, a.timeout), health_probe(http_b, a.timeout)]
        started = Started(wanted=max(1, a.streams // 2))
        sends += [
            when(started.event, a.timeout, send_attack(http_b, r, a.timeout))
            for r in chosen(poisons(" (mid-stream)"), a.only)
        ]
        streams, reads, *outcomes = await asyncio.gather(
            released(normal_phase(http_a, a.streams, a, started), started),
            cross_key_reads(http_b, file_id, a.timeout),
            *sends,
        )
        run.hostile, run.outcomes = streams, [*outcomes, *reads]
    finally:
        trickler.cancel()
        run.outcomes.append(close_slowloris(loris, time.perf_counter() - start))


async def released(phase: Awaitable[list[StreamResult]], started: Started):
    """The streams' results; the mid-stream poisons go at the latest when all have ended."""
    try:
        return await phase
    finally:
        started.event.set()


async def normal_stream(
    http: httpx.AsyncClient, i: int, a, started: Started | None
) -> StreamResult:
    result = StreamResult()
    try:
        await asyncio.wait_for(_read_stream(http, i, a.max_tokens, result, started), a.timeout)
    except (TimeoutError, httpx.TimeoutException):
        result.error = f"no end in {a.timeout:.0f} s"
    except (httpx.HTTPError, OSError, ValueError) as e:
        result.error = type(e).__name__
    except Exception as e:  # noqa: BLE001 - the bench's own failure, reported with the stream
        result.error = f"bench error {e!r}"
    return result


async def _read_stream(http, i: int, max_tokens: int, result: StreamResult, started) -> None:
    body = {"model": MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": max_tokens,
            "temperature": 0.8, "top_p": 0.95, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            result.error = f"HTTP {response.status_code} {error_code(response)}".strip()
            return
        async for line in response.aiter_lines():
            first = line.startswith("data: ") and _on_frame(line[6:], result, start)
            if first and started is not None:
                started.hit()


def _on_frame(data: str, result: StreamResult, start: float) -> bool:
    """Read one SSE frame into `result`; True when it carried the stream's first token."""
    if data.strip() == "[DONE]":
        result.done = True
        return False
    frame = json.loads(data)
    if frame.get("error"):
        error = frame["error"]
        detail = error.get("code") or error.get("message") if isinstance(error, dict) else error
        result.error = f"error event: {str(detail)[:60]}"
    if frame.get("usage"):
        result.tokens = int(frame["usage"].get("completion_tokens") or 0)
    if not frame.get("choices"):
        return False
    result.frames += 1
    if result.ttft is None:
        result.ttft = time.perf_counter() - start
        return True
    return False


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} logical CPUs ({psutil.cpu_count(logical=False)} cores)"


def print_hostile(run: HostileRun, a: argparse.Namespace, load_before: float) -> None:
    print(
        f"machine: {machine()}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other work on it slows both phases)"
    )
    print(f"server: genserve-starter, --max-batch-size {a.batch}, --max-file-bytes "
          f"{UPLOAD_LIMIT}, GENSERVE_API_KEYS=A,B")  # fmt: skip
    print(f"normal streams (key A): /v1/completions, {a.max_tokens} tokens each with ignore_eos, "
          "temperature 0.8, top_p 0.95")  # fmt: skip
    for name, streams in (("baseline", run.baseline), ("hostile", run.hostile)):
        print(f"  {name:<9} {stream_line(streams, a)}")
    ratio = ttft_ratio(run)
    print(f"  TTFT p50 hostile / baseline: {ratio:.2f}x (goal <= {TTFT_GOAL:.1f}x)")
    print(f"  server RSS {rss_line(run)}")
    print_table(run.outcomes, a.slowloris)
    if any(o.leaked and o.kind.startswith("member DELETE") for o in run.outcomes):
        print("!!! key B, a member key, UNLOADED the base model genserve-starter. It was sent")
        print("!!! last, after every measurement above: no failure above comes from it.")


def stream_line(streams: list[StreamResult], a: argparse.Namespace) -> str:
    ok = sum(s.completed(a.max_tokens) for s in streams)
    p50 = percentile([s.ttft for s in streams if s.ttft is not None], 50)
    line = f"{ok}/{a.streams} completed, TTFT p50 {p50:.3f} s"
    errors = collections.Counter(s.error or f"{s.tokens} tokens" for s in streams
                                 if not s.completed(a.max_tokens))  # fmt: skip
    if errors:
        line += "; failed: " + ", ".join(f"{e} x{n}" for e, n in errors.most_common(4))
        got = percentile([s.frames for s in streams if not s.completed(a.max_tokens)], 50)
        line += f" (median {got:.0f} of {a.max_tokens} tokens received)"
    return line


def ttft_ratio(run: HostileRun) -> float:
    def p50(streams: list[StreamResult]) -> float:
        return percentile([s.ttft for s in streams if s.ttft is not None], 50)

    return p50(run.hostile) / p50(run.baseline) if run.baseline and run.hostile else math.nan


def rss_change(run: HostileRun) -> float:
    if not run.rss_before or not run.rss_after:
        return math.nan
    return (run.rss_after - run.rss_before) / run.rss_before


def rss_line(run: HostileRun) -> str:
    def mib(value: int | None) -> str:
        return f"{value / MIB:.0f} MiB" if value else "(not measured)"

    return (f"before the hostile phase {mib(run.rss_before)}, after it {mib(run.rss_after)} "
            f"({rss_change(run):+.1%}, goal within +{RSS_GOAL:.0%})")  # fmt: skip


def print_table(outcomes: list[Outcome], slowloris: int) -> None:
    kinds: dict[str, list[Outcome]] = {}
    for o in outcomes:
        kinds.setdefault(o.kind, []).append(o)
    print(f"hostile requests (key B), with {slowloris} slowloris sockets held during the phase:")
    print(f"  {'kind':<35} {'status':<14} {'error code':<24} {'time s':>7}  note")
    for kind, group in kinds.items():
        codes = collections.Counter(str(o.status or "-") for o in group)
        status = ", ".join(c if n == 1 else f"{c} x{n}" for c, n in codes.items())
        code = ",".join(sorted({o.code for o in group if o.code})) or "-"
        note = next((o.note for o in group if o.note), "")
        seconds = max(o.seconds for o in group)
        print(f"  {kind:<35} {status:<14} {code[:24]:<24} {seconds:>7.2f}  {note[:70]}")


def report_goals(run: HostileRun, a: argparse.Namespace) -> int:
    missed = goals_missed(run, a)
    if not missed:
        print("all goals met")
        return 0
    print("GOALS MISSED:")
    for line in missed:
        print(f"  - {line}")
    return 1


def goals_missed(run: HostileRun, a: argparse.Namespace) -> list[str]:
    missed = [f"the run stopped early: {run.broken}"] if run.broken else []
    if run.server_exit is not None:
        missed.append(f"the server exited with {run.server_exit}")
    for name, streams in (("baseline", run.baseline), ("hostile", run.hostile)):
        ok = sum(s.completed(a.max_tokens) for s in streams)
        if ok < a.streams:
            missed.append(f"{name}: {a.streams - ok} of {a.streams} normal streams failed")
    ratio = ttft_ratio(run)
    if not ratio <= TTFT_GOAL:
        missed.append(f"TTFT p50 ratio {ratio:.2f}x > {TTFT_GOAL:.1f}x")
    change = rss_change(run)
    if not change <= RSS_GOAL:
        missed.append(f"server RSS {change:+.1%} after the hostile phase (goal <= +{RSS_GOAL:.0%})")
    counted = collections.Counter(m for o in run.outcomes if (m := outcome_miss(o)))
    return missed + [m if n == 1 else f"{m} x{n}" for m, n in counted.items()]


def outcome_miss(o: Outcome) -> str:
    if o.leaked:
        return f"{o.kind}: HTTP {o.status}, {o.note}"
    if o.status is not None and o.status >= 500:
        return f"{o.kind}: HTTP {o.status} {o.code}".strip()
    if o.code in ("timeout", "no answer", "bench error"):
        return f"{o.kind}: {o.code} ({o.note})"
    return ""


if __name__ == "__main__":
    main()
