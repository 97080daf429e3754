"""Continuous batching, abort on disconnect, and the bounded queue, on a live server."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server


def running(server: LiveServer) -> int:
    return httpx.get(server.url + "/health").json()["models"]["tiny-llama"]["running"]


async def stream_times(
    http: httpx.AsyncClient, body: dict, started: asyncio.Event | None = None
) -> tuple[float, float]:
    """(time of first token, time of last event) of one streaming completion."""
    first = None
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.monotonic()
                if started is not None:
                    started.set()
    return first, time.monotonic()


async def test_request_joins_running_batch(server: LiveServer, model_id: str) -> None:
    long = {"model": model_id, "prompt": "a", "max_tokens": 400, "ignore_eos": True}
    short = {"model": model_id, "prompt": "b", "max_tokens": 4, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        started = asyncio.Event()
        long_task = asyncio.create_task(stream_times(http, long, started))
        await started.wait()
        short_first, _ = await stream_times(http, short)
        _, long_end = await long_task
    assert short_first < long_end, "the second request waited for the first to finish"


async def test_disconnect_frees_slot(server: LiveServer, model_id: str) -> None:
    body = {"model": model_id, "prompt": "a", "max_tokens": 450, "ignore_eos": True}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                break
        assert running(server) == 1
    closed = time.monotonic()
    while running(server) and time.monotonic() - closed < 1.0:
        await asyncio.sleep(0.02)
    assert running(server) == 0, "the aborted request still holds its slot after 1 s"


async def test_non_streaming_disconnect_frees_slot(server: LiveServer, model_id: str) -> None:
    body = {"model": model_id, "prompt": "a", "max_tokens": 450, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        task = asyncio.create_task(http.post("/v1/completions", json=body))
        while running(server) == 0:
            await asyncio.sleep(0.01)
        task.cancel()
    closed = time.monotonic()
    while running(server) and time.monotonic() - closed < 2.0:
        await asyncio.sleep(0.05)
    assert running(server) == 0


@pytest.fixture(scope="module")
def small_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    """One slot and a waiting queue of one: the third concurrent request is over capacity."""
    args = ("--max-batch-size", "1", "--max-waiting", "1")
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs-small"), *args)
    yield srv
    srv.stop()


async def test_queue_full_gives_429_with_retry_after(small_server: LiveServer) -> None:
    body = {"model": "tiny-llama", "prompt": "a", "max_tokens": 300, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as http:
        results = await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(4)])
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429]
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert_valid(r.json(), "ErrorResponse")
            assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_official_client_retries_after_429(small_server: LiveServer) -> None:
    """The client's own retry honours Retry-After and succeeds once the slot frees."""
    # Enough retries (Retry-After: 1 s each) to outlast the two blockers on a loaded machine.
    client = openai.OpenAI(base_url=small_server.url + "/v1", api_key="x", max_retries=30)
    blocker = {"model": "tiny-llama", "prompt": "a", "max_tokens": 400, "ignore_eos": True}

    async def scenario():  # noqa: ANN202
        async with (
            httpx.AsyncClient(base_url=small_server.url, timeout=120) as http,
            # A stream's headers come once it is admitted: then the slot and the queue are
            # taken, and stay so while the blockers run (the second waits for the first).
            http.stream("POST", "/v1/completions", json={**blocker, "stream": True}) as one,
            http.stream("POST", "/v1/completions", json={**blocker, "stream": True}) as two,
        ):
            assert one.status_code == two.status_code == 200
            # Read as they come: a blocker stalled on a full socket would hold its slot.
            bodies = [asyncio.create_task(stream.aread()) for stream in (one, two)]
            r = await asyncio.to_thread(
                client.completions.with_raw_response.create,
                model="tiny-llama",
                prompt="b",
                max_tokens=2,
            )
            for body in await asyncio.gather(*bodies):
                assert "data: [DONE]" in body.decode()
            return r

    raw = asyncio.run(scenario())
    assert raw.retries_taken >= 1  # it was refused at first, and retried by itself
    r = raw.parse()
    assert r.choices[0].text is not None
    assert json.loads(r.model_dump_json())["usage"]["completion_tokens"] >= 1
