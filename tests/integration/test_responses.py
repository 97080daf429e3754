"""The Responses API with the official client, unmodified: text, streaming with typed events,
json_schema text.format, a function tool, previous_response_id chains, retrieve, input_items,
delete; every body and event checked against OpenAI's schemas; stored responses per project,
surviving a restart."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server

MODEL = "tiny-llama"
SEED = {"seed": 11}  # an extension field: the official client sends it as extra_body
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"enum": ["a", "b"]},
    },
    "required": ["x", "tag"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "name": "get_point", "parameters": POINT, "strict": True}


def raw(client: openai.OpenAI, **kw) -> dict:
    """The body as sent, for schema checks (the client's objects add their own defaults)."""
    return client.responses.with_raw_response.create(**kw).http_response.json()


def test_text(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, input="Say hi", instructions="Be brief.", max_output_tokens=8, extra_body=SEED
    )
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and isinstance(r.output_text, str)
    assert r.usage.output_tokens <= 8 and r.usage.input_tokens > 0
    body = raw(client, model=MODEL, input="Say hi", max_output_tokens=8, extra_body=SEED)
    assert_valid(body, "Response")


def test_same_seed_same_text_as_chat(client: openai.OpenAI) -> None:
    """One generation path: a response is the chat completion of the same messages."""
    r = client.responses.create(model=MODEL, input="hello", max_output_tokens=12, extra_body=SEED)
    c = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=12, seed=11
    )
    assert r.output_text == c.choices[0].message.content


def test_streaming_events(server: LiveServer, client: openai.OpenAI) -> None:
    kinds, text, final = [], "", None
    # create(stream=True): the stream() helper insists on response.completed, and a
    # response cut at max_output_tokens ends with response.incomplete, as OpenAI's do.
    for event in client.responses.create(
        model=MODEL, input="hello", max_output_tokens=12, extra_body=SEED, stream=True
    ):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        final = getattr(event, "response", final)
    assert kinds[:4] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ]  # fmt: skip
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert final.output_text == text
    plain = client.responses.create(
        model=MODEL, input="hello", max_output_tokens=12, extra_body=SEED
    )
    assert plain.output_text == text
    for event in stream_events(server, {"input": "hello", "max_output_tokens": 12, **SEED}):
        assert_valid(event, "ResponseStreamEvent")


def stream_events(server: LiveServer, body: dict) -> list[dict]:
    events = []
    body = {"model": MODEL, "stream": True, **body}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "name": "point", "schema": POINT, "strict": True}
    r = client.responses.create(
        model=MODEL, input="a point", text={"format": fmt}, max_output_tokens=60, extra_body=SEED
    )
    jsonschema.validate(json.loads(r.output_text), POINT)
    assert r.text.format.type == "json_schema"
    body = raw(
        client, model=MODEL, input="a point", text={"format": fmt}, max_output_tokens=60,
        tools=[TOOL], tool_choice="none", extra_body=SEED,
    )  # fmt: skip
    assert_valid(body, "Response")
    assert json.loads(body["output"][0]["content"][0]["text"]) == json.loads(r.output_text)


def test_function_tool_streamed_and_not(server: LiveServer, client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, input="point?", tools=[TOOL], tool_choice="required")
    r = client.responses.create(
        **kw, max_output_tokens=100, parallel_tool_calls=False, extra_body=SEED
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_point"
    jsonschema.validate(json.loads(calls[0].arguments), POINT)
    body = {
        "input": "point?", "tools": [TOOL], "tool_choice": "required", "max_output_tokens": 100,
        "parallel_tool_calls": False, **SEED,
    }  # fmt: skip
    events = stream_events(server, body)
    for event in events:
        assert_valid(event, "ResponseStreamEvent")
    deltas = "".join(
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    )
    assert deltas == calls[0].arguments
    assert events[-1]["response"]["output"][0]["arguments"] == calls[0].arguments


def test_named_function_and_its_output_continue_the_chain(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL, input="point?", tools=[TOOL],
        tool_choice={"type": "function", "name": "get_point"}, max_output_tokens=100,
        parallel_tool_calls=False, extra_body=SEED,
    )  # fmt: skip
    call = next(item for item in first.output if item.type == "function_call")
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[TOOL], max_output_tokens=5,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"ok":1}'}],
    )  # fmt: skip
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens


def test_chain_retrieve_input_items_delete(server: LiveServer, client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=6)
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=6
    )
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=6)
    # The second sees the first's input and output: its prompt holds them.
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    assert_valid(httpx.get(f"{server.url}/v1/responses/{second.id}").json(), "Response")
    items = client.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["What is my name?"]
    page = httpx.get(f"{server.url}/v1/responses/{second.id}/input_items").json()
    assert_valid(page, "ResponseItemList")
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id)


def test_item_list_input_and_store_false(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, store=False, max_output_tokens=4,
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
    )  # fmt: skip
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"input": []}, "input"),
        ({"input": [{"type": "image_generation_call"}]}, "input"),
        ({"input": "word " * 3000}, "input"),  # past the context: the field is `input` here
        ({"input": [{"type": "reasoning", "summary": "x"}]}, "input"),
        ({"input": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": 5}]}]},
         "input"),
        # stored, then listed back as first_id: a string, as OpenAI's schema has it
        ({"input": [{"role": "user", "content": "hi", "id": {"x": [1]}}]}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        # A conversation's id, as a string or {"id": ...}; never with previous_response_id
        ({"conversation": {"id": 123}}, "conversation"),
        ({"conversation": "conv_123", "previous_response_id": "resp_1"}, "conversation"),
        ({"text": {"format": {"type": "json_schema", "name": "s",
                              "schema": {"type": "array", "uniqueItems": True}}}},
         "text.format"),
        # OpenAI names Responses' own field, never chat's response_format
        ({"text": {"format": {"type": "json_schema", "name": "s"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_object"}}, "tools": [TOOL]}, "text.format"),
    ],
)  # fmt: skip
def test_bad_requests_are_400(server: LiveServer, extra: dict, param: str) -> None:
    body = {"model": MODEL, "input": "x", "max_output_tokens": 2, **extra}
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)
    if "tools" not in extra and "tool_choice" not in extra and "text" not in extra:
        counted = httpx.post(server.url + "/v1/responses/input_tokens", json=body, timeout=60)
        assert counted.status_code == 400 and counted.json()["error"]["param"] == param


def test_retrieve_with_stream_is_400_and_tools_echo_strict(
    server: LiveServer, client: openai.OpenAI
) -> None:
    loose = {k: v for k, v in TOOL.items() if k != "strict"}
    r = client.responses.create(model=MODEL, input="x", max_output_tokens=2, tools=[loose])
    assert r.tools[0].strict is True  # the Responses API's default
    with pytest.raises(openai.BadRequestError) as caught:  # it was an empty stream
        client.responses.retrieve(r.id, stream=True)
    assert caught.value.body["param"] == "stream"


def test_output_text_logprobs_when_included(server: LiveServer, client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, input="Say x", max_output_tokens=6, top_logprobs=2)
    kw["extra_body"] = {"seed": 3}
    kw["include"] = ["message.output_text.logprobs"]
    r = client.responses.create(**kw)
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens == 6 and r.top_logprobs == 2
    # (their tokens may name special tokens the text leaves out: a random model's choice)
    assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in part.logprobs)
    streamed = list(client.responses.create(stream=True, **kw))
    deltas = [lp for e in streamed if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = streamed[-1].response  # response.incomplete: max_output_tokens was reached
    assert [lp.token for lp in deltas] == [lp.token for lp in part.logprobs]  # same seed
    assert [lp.token for lp in done.output[0].content[0].logprobs] == [lp.token for lp in deltas]
    plain = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    assert plain.output[0].content[0].logprobs == []  # not asked for
    r = httpx.post(server.url + "/v1/responses", json={**kw, "include": ["bogus"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "include"


def test_stored_per_project_and_across_restarts(
    tiny_model_dir, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = tmp_path_factory.mktemp("responses")
    args = ("--data-dir", str(logs / "data"))
    env = {"GENSERVE_API_KEYS": "key-a,key-b"}
    srv = start_server(tiny_model_dir, logs, *args, env=env)
    try:
        a = openai.OpenAI(base_url=srv.url + "/v1", api_key="key-a", max_retries=0)
        made = a.responses.create(model=MODEL, input="remember me", max_output_tokens=4)
    finally:
        srv.stop()
    srv = start_server(tiny_model_dir, logs, *args, env=env)
    try:
        a = openai.OpenAI(base_url=srv.url + "/v1", api_key="key-a", max_retries=0)
        b = openai.OpenAI(base_url=srv.url + "/v1", api_key="key-b", max_retries=0)
        assert a.responses.retrieve(made.id).output_text == made.output_text
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.delete(made.id)
    finally:
        srv.stop()
