"""A tiny Qwen3 on a live server runs on BatchedHFRunner: 8 concurrent streams all complete,
and seeded requests give the same text under load as alone (DESIGN rule 4). The throughput
figure (8 streams vs 1) is bench/families.py's, not an assert here."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server import LiveServer, start_server
from tests.tiny_families import build_family_dir

STREAMS = 8


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    folder = build_family_dir(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3")
    if folder is None:
        pytest.skip("the installed transformers has no qwen3")
    logs = tmp_path_factory.mktemp("logs")
    srv = start_server(folder, logs, "--max-batch-size", str(STREAMS), "--max-model-len", "256")
    yield srv
    srv.stop()


def body(i: int, seed: int | None) -> dict:
    return {
        "model": "tiny-qwen3",
        "prompt": f"Stream {i} says" + " hello" * i,
        "max_tokens": 24,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
    }


async def stream_text(http: httpx.AsyncClient, req: dict) -> tuple[str, str | None]:
    """(text, finish_reason) of one streamed completion."""
    text, finish = "", None
    async with http.stream("POST", "/v1/completions", json=req) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    return text, finish


async def test_eight_streams_complete_and_seeded_ones_match_alone(qwen3_server) -> None:  # noqa: ANN001
    assert "qwen3: BatchedHFRunner" in qwen3_server.log()
    reqs = [body(i, seed=100 + i if i % 2 == 0 else None) for i in range(STREAMS)]
    async with httpx.AsyncClient(base_url=qwen3_server.url, timeout=120) as http:
        together = await asyncio.gather(*(stream_text(http, r) for r in reqs))
        assert [f for _, f in together] == ["length"] * STREAMS
        for i, req in enumerate(reqs):
            if req["seed"] is not None:
                assert await stream_text(http, req) == together[i], f"stream {i}"
