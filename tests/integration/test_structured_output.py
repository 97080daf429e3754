"""response_format: JSON that a random-weight model could only produce through the grammar."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from tests.server import LiveServer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "toys": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 8},
                    "count": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["label", "count"],
                "additionalProperties": False,
            },
        },
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 100, "maximum": 999}},
            "required": ["id"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "toys", "owner"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}


async def test_100_of_100_seeded_samples_validate_among_free_requests(server: LiveServer) -> None:
    constrained = [
        {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "describe a pet"}],
            "response_format": FORMAT,
            "seed": seed,
            "temperature": 1.0,
            "max_tokens": 400,
        }
        for seed in range(100)
    ]
    free = [
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        for _ in range(10)
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
        replies = await asyncio.gather(
            *[http.post("/v1/chat/completions", json=b) for b in constrained + free]
        )
    assert all(r.status_code == 200 for r in replies), [
        r.text for r in replies if r.status_code != 200
    ][:1]
    outputs = [r.json()["choices"][0] for r in replies[:100]]
    assert [o["finish_reason"] for o in outputs] == ["stop"] * 100
    docs = [json.loads(o["message"]["content"]) for o in outputs]
    for doc in docs:
        jsonschema.validate(doc, SCHEMA)
    assert len({json.dumps(d) for d in docs}) > 50  # sampled, not one canned answer


def test_json_object_gives_an_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"},
        max_tokens=300,
        seed=4,
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_seeded_structured_output_repeats(client: openai.OpenAI) -> None:
    def run() -> str:
        return (
            client.chat.completions.create(
                model="tiny-llama",
                messages=[{"role": "user", "content": "x"}],
                response_format=FORMAT,
                max_tokens=400,
                seed=9,
            )
            .choices[0]
            .message.content
        )

    assert run() == run()


def test_completions_accept_response_format_too(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny-llama",
        prompt="{",
        max_tokens=400,
        seed=1,
        extra_body={"response_format": FORMAT},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


@pytest.mark.parametrize(
    "schema,keyword",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "x-guidance": {}}}},
            "x-guidance",
        ),
    ],
)
def test_unenforceable_schema_is_400_naming_it(
    client: openai.OpenAI, schema: dict, keyword: str
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}], response_format=fmt
        )
    assert e.value.param == "response_format"
    assert keyword in e.value.message


def test_missing_schema_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "s"}},
        )
    assert e.value.param == "response_format"
