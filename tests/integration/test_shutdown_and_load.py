"""SIGTERM drains without losing a stream; overload answers 429 and memory comes back."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.server import start_server, tree_rss


async def stream_text(http: httpx.AsyncClient, body: dict) -> tuple[str, str | None]:
    text, reason = [], None
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text.append(choice["text"])
                reason = choice["finish_reason"] or reason
    return "".join(text), reason


async def test_sigterm_finishes_8_streams_refuses_new_and_exits_0(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    srv = start_server(tiny_model_dir, tmp_path, "--max-batch-size", "8")
    # As long as the tiny model allows (512 positions): the late request must come while the
    # streams still run, and a fast machine runs 300 tokens at 8 rows in about half a second.
    body = {"model": "tiny-llama", "prompt": "a", "max_tokens": 500, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
        streams = [asyncio.create_task(stream_text(http, body)) for _ in range(8)]
        while httpx.get(srv.url + "/health").json()["models"]["tiny-llama"]["running"] < 8:
            await asyncio.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        while "draining" not in srv.log():  # the signal handled: new requests are refused
            await asyncio.sleep(0.01)
        late = await http.post("/v1/completions", json={**body, "max_tokens": 1})
        results = await asyncio.gather(*streams)
    assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable_error"
    assert [reason for _, reason in results] == ["length"] * 8
    assert srv.proc.wait(timeout=60) == 0


async def test_drain_timeout_cuts_a_running_stream_with_an_error_event(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Past --drain-timeout a stream still running ends with an error event (not a dropped
    connection), and the process exits 0 at once: uvicorn alone waited for the stream."""
    srv = start_server(tiny_model_dir, tmp_path, "--drain-timeout", "0", "--max-batch-size", "1")
    body = {"model": "tiny-llama", "prompt": "a", "max_tokens": 500, "ignore_eos": True}
    events = []
    async with (
        httpx.AsyncClient(base_url=srv.url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=15) == 0
    last = httpx.Response(200, content=events[-1]).json()
    assert last["error"]["type"] == "service_unavailable_error", events[-3:]
    assert "drain timeout" in last["error"]["message"]
    assert len(events) < 400  # cut, not run to its 500 tokens
    assert "drain timeout: 1 requests still running are cut" in srv.log()


def test_a_stalled_upload_does_not_hold_the_shutdown(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An upload that stops sending mid-body is cut a few seconds after the drain timeout,
    and the lifespan's shutdown still runs (uvicorn alone waited for it forever)."""
    import socket
    import time

    srv = start_server(tiny_model_dir, tmp_path, "--drain-timeout", "1")
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    with sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        )  # and never the rest
        time.sleep(0.5)  # the route is reading the body: a request in flight
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 10
    assert "drain timeout: 1 requests still running are cut" in srv.log()
    assert "Application shutdown complete" in srv.log()  # the engines were stopped in order


@pytest.fixture()
def small(tiny_model_dir: Path, tmp_path: Path):
    srv = start_server(tiny_model_dir, tmp_path, "--max-batch-size", "4", "--max-waiting", "2")
    yield srv
    srv.stop()


async def test_load_at_4x_capacity_gives_only_200_and_429(small) -> None:
    """16 concurrent clients against 4 slots (+2 queued), three waves; then RSS is back."""
    proc = psutil.Process(small.proc.pid)
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 40, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=small.url, timeout=120) as http:
        await http.post("/v1/completions", json=body)  # warm, so RSS is measured warm
        # and once the grammar helper has loaded (it starts in the background with the model)
        for _ in range(600):
            health = (await http.get("/health")).json()
            if health["models"]["tiny-llama"]["grammar"] == "ready":
                break
            await asyncio.sleep(0.1)
        before = tree_rss(proc)
        replies = []
        for _ in range(3):
            replies += await asyncio.gather(
                *[http.post("/v1/completions", json=body) for _ in range(16)]
            )
    codes = {r.status_code for r in replies}
    assert codes == {200, 429}
    assert all(int(r.headers["retry-after"]) >= 1 for r in replies if r.status_code == 429)
    after = tree_rss(proc)
    assert after <= before * 1.10, (before, after)


def test_official_client_retries_through_overload(small) -> None:
    """The client's own retries (honouring Retry-After) get every request through."""
    client = openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=8)

    async def burst() -> list:
        return await asyncio.gather(
            *[
                asyncio.to_thread(
                    client.completions.create, model="tiny-llama", prompt="x", max_tokens=30,
                    extra_body={"ignore_eos": True},
                )
                for _ in range(16)
            ]
        )  # fmt: skip

    results = asyncio.run(burst())
    assert all(r.usage.completion_tokens == 30 for r in results)
