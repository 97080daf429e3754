"""Seeds reproduce under load: the same 20 seeded requests give the same tokens alone and
interleaved with 31 unseeded ones of other lengths and parameters, in shuffled order: on a
default server (seeded requests take the batch-invariant path, the others do not) and on a
--deterministic one (every request does)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from tests.server import LiveServer, start_server


@pytest.fixture(scope="module", params=["default", "--deterministic"])
def big_server(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    mode = [request.param] if request.param != "default" else []
    srv = start_server(
        tiny_model_dir, tmp_path_factory.mktemp("logs-32"), "--max-batch-size", "32", *mode
    )
    yield srv
    srv.stop()


def seeded_bodies() -> list[dict]:
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "json",
        "parses",
        "text",
    ]
    bodies = []
    for i in range(20):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        bodies.append(
            {
                "prompt": prompt,
                "max_tokens": rng.randint(8, 40),
                "temperature": rng.choice([0.0, 0.7, 1.0, 1.5]),
                "top_p": rng.choice([1.0, 0.9, 0.5]),
                "top_k": rng.choice([0, 5, 50]),
                "seed": 1000 + i,
                "ignore_eos": True,
            }
        )
    return bodies


def noise_bodies() -> list[dict]:
    rng = random.Random(1)
    return [
        {
            "prompt": "x " * rng.randint(1, 200),
            "max_tokens": rng.randint(1, 80),
            "temperature": rng.choice([0.0, 1.0]),
            "ignore_eos": True,
        }
        for _ in range(31)
    ]


async def complete(http: httpx.AsyncClient, body: dict) -> str:
    r = await http.post("/v1/completions", json={"model": "tiny-llama", **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def test_seeded_outputs_identical_alone_and_under_load(big_server: LiveServer) -> None:
    seeded = seeded_bodies()
    async with httpx.AsyncClient(base_url=big_server.url, timeout=300) as http:
        alone = [await complete(http, b) for b in seeded]

        jobs = [("seeded", i, b) for i, b in enumerate(seeded)]
        jobs += [("noise", i, b) for i, b in enumerate(noise_bodies())]
        random.Random(2).shuffle(jobs)

        async def submit(job: tuple[str, int, dict]) -> tuple[str, int, str]:
            await asyncio.sleep(random.Random(job[1]).random() * 0.2)  # staggered arrival
            return job[0], job[1], await complete(http, job[2])

        results = await asyncio.gather(*[submit(j) for j in jobs])
    loaded = {i: text for kind, i, text in results if kind == "seeded"}
    mismatched = [i for i in range(20) if loaded[i] != alone[i]]
    assert not mismatched, f"seeded requests {mismatched} changed under load"
    assert len(set(alone)) == 20
