"""A value of the wrong JSON type is a 400 in OpenAI's shape naming the field, on every route,
against a live server: `"n": "2"`, `"max_tokens": 5.0`, `"temperature": "0.5"`, a token list
holding a string. Before, pydantic's lax mode ran them (n=2, 5 tokens) or, in a union,
read `["1", 2]` as token ids. Query parameters still parse from the URL's text."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server import LiveServer

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "n": "2"}, "n"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 5.0}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "seed": "7"}, "seed"),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "yes"}},
         "stream_options.include_usage"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]},
         "messages.[0].content"),
        ("/v1/completions", {**TEXT, "temperature": "0.5"}, "temperature"),
        ("/v1/completions", {**TEXT, "prompt": [1, "a"]}, "prompt.[1]"),
        ("/v1/completions", {**TEXT, "stop": 5}, "stop"),
        ("/v1/embeddings", {"model": "tiny-llama", "input": ["1", 2]}, "input.[1]"),
        ("/v1/responses", {"model": "tiny-llama", "input": "hi", "max_output_tokens": "9"},
         "max_output_tokens"),
        ("/tokenize", {"model": "tiny-llama", "prompt": 5}, "prompt"),
        ("/v1/fine_tuning/jobs", {"model": "tiny-llama", "training_file": "f", "seed": "3"},
         "seed"),
        ("/v1/batches", {"input_file_id": 5, "endpoint": "/v1/completions",
                         "completion_window": "24h"}, "input_file_id"),
        ("/v1/conversations", {"metadata": {"k": 1}}, "metadata.k"),
    ],
)  # fmt: skip
def test_a_wrong_json_type_is_a_400_naming_the_field(
    server: LiveServer, path: str, body: dict, param: str
) -> None:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"].startswith(f"Invalid type for '{param}': expected ")


def test_the_official_client_reads_openais_words(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**CHAT, extra_body={"n": "2"})
    assert caught.value.param == "n"
    assert caught.value.body["message"] == (
        "Invalid type for 'n': expected an integer, but got a string instead."
    )


def test_right_types_still_run(client: openai.OpenAI) -> None:
    """An integer for a number stays accepted (temperature=1), as OpenAI takes it."""
    out = client.completions.create(**TEXT, temperature=1, top_p=1, seed=7, n=2)
    assert len(out.choices) == 2


@pytest.mark.parametrize("path", ["/v1/files?limit=10", "/v1/fine_tuning/jobs?limit=2"])
def test_query_integers_still_parse_from_the_url(server: LiveServer, path: str) -> None:
    assert httpx.get(server.url + path, timeout=30).status_code == 200
