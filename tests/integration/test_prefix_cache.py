"""The paged KV cache on a live server, through the official client: prefix caching changes no
output (greedy, and seeded), reports cached_tokens as OpenAI does, a small pool holds many
short requests at once and still runs a long one, and a pool too small for its load preempts
requests without losing or repeating a token."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server
from tests.tiny_model import build_tiny_model

MODEL = "tiny-llama"
# Chunks of 64 - 16 = 48 tokens: seeded requests hit the cache in whole chunks, so prompts of
# a few hundred tokens cross several chunk boundaries.
SMALL_STEPS = ("--max-batch-size", "16", "--max-num-batched-tokens", "64")
POOL_2048 = ("--kv-cache-tokens", "2048", "--max-model-len", "2048")


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / MODEL
    return build_tiny_model(folder, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def cached(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = start_server(long_model_dir, tmp_path_factory.mktemp("logs"), *SMALL_STEPS, *POOL_2048)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def uncached(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = start_server(
        long_model_dir, tmp_path_factory.mktemp("logs"), *SMALL_STEPS, *POOL_2048,
        "--no-prefix-caching",
    )  # fmt: skip
    yield srv
    srv.stop()


def client(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


SYSTEM = " ".join(f"rule {i}: answer in plain words, cite the source." for i in range(30))
QUESTIONS = ("What is a fox?", "Why is the sky blue?", "Name three colours.")


def ask(c: openai.OpenAI, question: str, **extra):  # noqa: ANN003, ANN201
    return c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        **{"max_tokens": 12, "temperature": 0, **extra},
    )


def metric(srv: LiveServer, name: str) -> float:
    text = httpx.get(srv.url + "/metrics").text
    found = re.search(rf"^genserve:{name}(?:_total)?{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def test_a_shared_system_prompt_is_served_from_the_cache(cached: LiveServer) -> None:
    c = client(cached)
    first = ask(c, QUESTIONS[0])
    again = ask(c, QUESTIONS[1])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hit = again.usage.prompt_tokens_details.cached_tokens
    assert hit > 0 and hit % 16 == 0 and hit < again.usage.prompt_tokens
    assert_valid(again.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert_valid(again.usage.model_dump(exclude_unset=True), "CompletionUsage")
    assert metric(cached, "prefix_cache_hits") >= hit
    assert metric(cached, "prefix_cache_queries") >= first.usage.prompt_tokens + hit


def test_streamed_and_completion_usage_report_cached_tokens(cached: LiveServer) -> None:
    c = client(cached)
    ask(c, QUESTIONS[2])  # warm
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello?"}],
        max_tokens=4, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens > 0
    assert_valid(usage[0].model_dump(exclude_unset=True), "CompletionUsage")
    prompt = SYSTEM + " and then some more words"
    c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    done = c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert done.usage.prompt_tokens_details.cached_tokens > 0
    assert_valid(done.model_dump(exclude_unset=True), "CreateCompletionResponse")


def test_outputs_are_the_same_with_and_without_prefix_caching(
    cached: LiveServer, uncached: LiveServer
) -> None:
    """Greedy and seeded, each question twice: the second time from the cache."""
    for extra in ({}, {"seed": 7, "temperature": 0.9}):
        want = [ask(client(uncached), q, **extra).choices[0].message.content for q in QUESTIONS]
        for _ in range(2):
            got = [ask(client(cached), q, **extra).choices[0].message.content for q in QUESTIONS]
            assert got == want, extra
    assert ask(client(cached), QUESTIONS[0], seed=7).usage.prompt_tokens_details.cached_tokens


def test_a_growing_conversation_reuses_all_of_the_previous_turn(
    cached: LiveServer, uncached: LiveServer
) -> None:
    """The next turn resends the last one and more: every token of it comes from the cache,
    not only its whole blocks (the last, partial block is cached too), and the answer is the
    one computed without the cache."""
    c = client(cached)
    turn = " ".join(f"turn {i} said the weather was fine on day {i}." for i in range(9))
    first = c.completions.create(model=MODEL, prompt=turn, max_tokens=1, temperature=0)
    n = first.usage.prompt_tokens
    assert n % 16 != 0  # so that a partial block exists
    turn += " Then the next day it rained and the river rose"
    got = c.completions.create(model=MODEL, prompt=turn, max_tokens=8, temperature=0)
    assert got.usage.prompt_tokens_details.cached_tokens == n
    want = client(uncached).completions.create(
        model=MODEL, prompt=turn, max_tokens=8, temperature=0
    )
    assert got.choices[0].text == want.choices[0].text
    assert want.usage.prompt_tokens_details.cached_tokens == 0


def test_a_2048_token_pool_runs_eight_short_requests_at_once_and_a_long_one(
    cached: LiveServer,
) -> None:
    """Static slots of 2,048 tokens held one sequence in this pool; blocks hold 8 at once."""

    async def run() -> list[int]:
        c = openai.AsyncOpenAI(base_url=cached.url + "/v1", api_key="unused", max_retries=0)
        short = [
            c.completions.create(
                model=MODEL, prompt=f"request {i} " * 10, max_tokens=200,
                temperature=0.8, extra_body={"ignore_eos": True},
            )
            for i in range(8)
        ]  # fmt: skip
        jobs = asyncio.gather(*short)
        peak = 0
        while not jobs.done():  # the most running at once, seen from /health
            peak = max(peak, await asyncio.to_thread(running, cached))
            await asyncio.sleep(0.01)
        long = await c.completions.create(
            model=MODEL, prompt=[(i % 200) + 5 for i in range(1800)], max_tokens=20, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        short_tokens = [d.usage.completion_tokens for d in jobs.result()]
        return [peak, long.usage.completion_tokens, *short_tokens]

    peak, long_tokens, *short_tokens = asyncio.run(run())
    assert peak >= 8 and long_tokens == 20 and short_tokens == [200] * 8


def running(srv: LiveServer) -> int:
    return httpx.get(srv.url + "/health").json()["models"][MODEL]["running"]


@pytest.fixture(scope="module")
def cramped(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    """512 tokens of KV for 8 sequences of ~150: decodes run out of blocks."""
    srv = start_server(
        tiny_model_dir, tmp_path_factory.mktemp("logs"), "--max-batch-size", "8",
        "--kv-cache-tokens", "512",
    )  # fmt: skip
    yield srv
    srv.stop()


def test_a_pool_too_small_preempts_and_every_stream_keeps_every_token(cramped: LiveServer) -> None:
    bodies = [
        {"prompt": f"story number {i}: " * 6, "max_tokens": 120, "seed": 100 + i,
         "temperature": 0.8, "ignore_eos": True}
        for i in range(8)
    ]  # fmt: skip
    with httpx.Client(base_url=cramped.url, timeout=300) as http:
        alone = [complete(http, b) for b in bodies]  # one at a time: never preempted
    assert metric(cramped, "num_preemptions") == 0

    async def together() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=cramped.url, timeout=300) as http:
            return await asyncio.gather(*(stream_pieces(http, b) for b in bodies))

    streamed = asyncio.run(together())
    assert metric(cramped, "num_preemptions") > 0
    for pieces, (text, tokens) in zip(streamed, alone, strict=True):
        assert "".join(pieces) == text  # no gap, no repeat, same tokens as alone
        assert tokens == 120


def complete(http: httpx.Client, body: dict) -> tuple[str, int]:
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]


async def stream_pieces(http: httpx.AsyncClient, body: dict) -> list[str]:
    import json

    pieces = []
    payload = {"model": MODEL, **body, "stream": True}
    async with http.stream("POST", "/v1/completions", json=payload) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
    return pieces
