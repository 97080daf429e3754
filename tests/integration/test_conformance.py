"""Every body our endpoints send validates against OpenAI's schema of the same name."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conformance import assert_valid, assert_valid_completion_chunk
from tests.server import LiveServer


@pytest.fixture()
def http(server: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def sse_events(http: httpx.Client, path: str, body: dict) -> list[dict | str]:
    events: list[dict | str] = []
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models(http: httpx.Client, model_id: str) -> None:
    assert_valid(http.get("/v1/models").json(), "ListModelsResponse")
    assert_valid(http.get(f"/v1/models/{model_id}").json(), "Model")


def test_completion_bodies(http: httpx.Client, model_id: str) -> None:
    body = {"model": model_id, "prompt": ["a", "b"], "max_tokens": 4, "n": 2}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert_valid(r.json(), "CreateCompletionResponse")
    assert len(r.json()["choices"]) == 4  # 2 prompts x n=2


def test_completion_stream_chunks(http: httpx.Client, model_id: str) -> None:
    body = {"model": model_id, "prompt": "a", "max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = sse_events(http, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        assert_valid_completion_chunk(e)
        if e["choices"] and e["choices"][0]["finish_reason"] is not None:
            assert_valid(e, "CreateCompletionResponse")  # the final chunk, strictly
    assert events[-2]["usage"]["completion_tokens"] >= 1
    # Not `"usage": null` in the others, as chat's chunks have it: the spec's prose asks for it
    # (the stream options are chat's), its CreateCompletionResponse refuses a null usage.
    assert all("usage" not in e for e in events[:-2])


def test_chat_bodies(http: httpx.Client, model_id: str) -> None:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = http.post("/v1/chat/completions", json={**body, "n": 2})
    assert r.status_code == 200
    assert_valid(r.json(), "CreateChatCompletionResponse")


def test_chat_stream_chunks(http: httpx.Client, model_id: str) -> None:
    body = {
        "model": model_id,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    assert len(events) > 3
    for e in events[:-1]:
        assert_valid(e, "CreateChatCompletionStreamResponse")
    assert events[-2]["usage"]["completion_tokens"] >= 1 and events[-2]["choices"] == []
    assert all("usage" in e and e["usage"] is None for e in events[:-2])  # as the last test's


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404),
        ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "top_p": 2}, 400),
        ("POST", "/v1/completions", {"prompt": "x"}, 400),
        ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": []}, 400),
        ("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": []}, 400),
        ("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": "hi"}, 400),
        ("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "x"}]}, 400),
        ("GET", "/v1/models/nope", None, 404),
        ("GET", "/v1/no-such-route", None, 404),
        ("DELETE", "/v1/completions", None, 405),
    ],
)
def test_error_bodies(
    http: httpx.Client, method: str, path: str, body: dict | None, status: int
) -> None:
    r = http.request(method, path, json=body)
    assert r.status_code == status
    assert_valid(r.json(), "ErrorResponse")
    assert r.json()["error"]["message"]


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert_valid(r.json(), "ErrorResponse")


def test_out_of_vocab_token_prompt_is_400(http: httpx.Client, model_id: str) -> None:
    r = http.post("/v1/completions", json={"model": model_id, "prompt": [10**9]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
