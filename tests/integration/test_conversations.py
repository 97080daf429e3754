"""The Conversations API with the official client, on a live server: a conversation's routes and
items (kept in order, paged, per project), and responses run in one: its items come before the
input, and the response's input and output join it when it ends (plain, streamed, in the
background, incomplete, `store: false`), not when it is cancelled or refused. Bodies are checked
against OpenAI's schemas."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.integration.test_responses_background import (
    LONG,
    A,
    B,
    api,
    engine_idle,
    engine_paused,
    finished,
    http,
    serve,
)
from tests.server import LiveServer, wait_until

MODEL = "tiny-llama"
SEED = {"seed": 11}
ADA = {"type": "message", "role": "user", "content": "My name is Ada."}
CALL = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "ok"}
CUT = {"max_output_tokens": 8, "extra_body": {"ignore_eos": True}}  # runs to its limit


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    live = serve(tiny_model_dir, tmp_path_factory.mktemp("conv"), "--max-batch-size", "8")
    yield live
    live.stop()


def ids(client: openai.OpenAI, conversation_id: str) -> list[str]:
    """The conversation's item ids, oldest first, through every page."""
    pages = client.conversations.items.list(conversation_id, order="asc", limit=3)
    return [item.id for item in pages]  # the client follows `after` across pages


def test_a_conversation_and_its_items(srv: LiveServer) -> None:
    client, h = api(srv), http(srv)
    made = h.post("/v1/conversations", json={"items": [ADA], "metadata": {"topic": "demo"}})
    assert made.status_code == 200, made.text
    conv = made.json()
    assert_valid(conv, "ConversationResource")
    assert conv["object"] == "conversation" and conv["metadata"] == {"topic": "demo"}
    got = client.conversations.retrieve(conv["id"])
    assert (got.id, got.created_at, got.metadata) == (
        conv["id"],
        conv["created_at"],
        {"topic": "demo"},
    )
    assert client.conversations.update(conv["id"], metadata={"x": "1"}).metadata == {"x": "1"}
    assert client.conversations.retrieve(conv["id"]).metadata == {"x": "1"}

    added = h.post(f"/v1/conversations/{conv['id']}/items", json={"items": [CALL, OUTPUT]})
    assert_valid(added.json(), "ConversationItemList")
    call_id, output_id = (item["id"] for item in added.json()["data"])
    first = client.conversations.items.list(conv["id"]).data[-1].id
    everything = ids(client, conv["id"])
    assert everything == [first, call_id, output_id]
    newest = h.get(f"/v1/conversations/{conv['id']}/items", params={"limit": 2}).json()
    assert_valid(newest, "ConversationItemList")
    assert [i["id"] for i in newest["data"]] == [output_id, call_id] and newest["has_more"]
    older = client.conversations.items.list(conv["id"], after=call_id)
    assert [i.id for i in older.data] == [first] and older.data[0].content[0].text == ADA["content"]

    item = h.get(f"/v1/conversations/{conv['id']}/items/{call_id}").json()
    assert_valid(item, "ConversationItem")
    assert item["call_id"] == "call_1" and item["name"] == "f"
    after_delete = h.delete(f"/v1/conversations/{conv['id']}/items/{call_id}").json()
    assert_valid(after_delete, "ConversationResource")
    assert ids(client, conv["id"]) == [first, output_id]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(call_id, conversation_id=conv["id"])

    gone = h.delete(f"/v1/conversations/{conv['id']}").json()
    assert_valid(gone, "DeletedConversationResource")
    assert gone == {"id": conv["id"], "object": "conversation.deleted", "deleted": True}
    for call in (
        lambda: client.conversations.retrieve(conv["id"]),
        lambda: client.conversations.items.list(conv["id"]),
        lambda: client.conversations.items.retrieve(output_id, conversation_id=conv["id"]),
        lambda: client.responses.create(model=MODEL, input="x", conversation=conv["id"]),
    ):
        with pytest.raises(openai.NotFoundError):
            call()


def test_responses_in_a_conversation_see_it_and_join_it(srv: LiveServer) -> None:
    """Two turns in a conversation run the prompts of the same two turns chained with
    previous_response_id: the same tokens in, the same text out (one seed)."""
    client = api(srv)
    conv = client.conversations.create(items=[ADA])
    turn = dict(model=MODEL, max_output_tokens=6, extra_body=SEED)
    one = client.responses.with_raw_response.create(
        conversation=conv.id, input="What is my name?", **turn
    ).http_response.json()
    assert_valid(one, "Response")
    assert one["conversation"] == {"id": conv.id}
    chained = client.responses.create(input=[ADA, user("What is my name?")], **turn)
    assert chained.conversation is None
    assert one["usage"]["input_tokens"] == chained.usage.input_tokens
    assert text(one) == chained.output_text
    listed = ids(client, conv.id)
    assert listed[-len(one["output"]) :] == [item["id"] for item in one["output"]]
    assert len(listed) == 2 + len(one["output"])  # Ada, the question, the answer

    # A streamed second turn, naming the conversation as an object.
    events = list(
        client.responses.create(
            conversation={"id": conv.id}, input="And again?", stream=True, **turn
        )
    )
    last = events[-1].response
    assert last.conversation.id == conv.id and last.status in ("completed", "incomplete")
    again = client.responses.create(previous_response_id=chained.id, input="And again?", **turn)
    assert last.usage.input_tokens == again.usage.input_tokens
    assert last.output_text == again.output_text
    assert ids(client, conv.id)[-len(last.output) :] == [item.id for item in last.output]
    counted = client.responses.input_tokens.count(model=MODEL, conversation=conv.id, input="x")
    ran = client.responses.create(model=MODEL, conversation=conv.id, input="x", max_output_tokens=1)
    assert counted.input_tokens == ran.usage.input_tokens


def user(content: str) -> dict:
    return {"type": "message", "role": "user", "content": content}


def text(response: dict) -> str:
    return "".join(
        part["text"]
        for item in response["output"]
        if item["type"] == "message"
        for part in item["content"]
    )


def test_what_joins_and_what_does_not(srv: LiveServer) -> None:
    """An incomplete response and a `store: false` one join; a cancelled one does not, nor one
    refused before it ran; deleting the conversation leaves its responses."""
    client = api(srv)
    conv = client.conversations.create()
    cut = client.responses.create(model=MODEL, input="go", conversation=conv.id, **CUT)
    assert cut.status == "incomplete"
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [i.id for i in items] == [items[0].id, *(o.id for o in cut.output)]
    assert items[-1].status == "incomplete"
    unstored = client.responses.create(
        model=MODEL, input="hi", conversation=conv.id, store=False, max_output_tokens=2
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    assert ids(client, conv.id)[-1] == unstored.output[-1].id
    before = ids(client, conv.id)
    with engine_paused(srv):
        held = client.responses.create(
            model=MODEL, input="x", conversation=conv.id, background=True, **LONG
        )
        assert client.responses.cancel(held.id).status == "cancelled"
    wait_until(lambda: engine_idle(srv), 60)
    with pytest.raises(openai.BadRequestError):  # refused before it ran
        client.responses.create(model=MODEL, input="x", conversation=conv.id, tools=[{"type": "x"}])
    assert ids(client, conv.id) == before
    client.conversations.delete(conv.id)
    assert client.responses.retrieve(cut.id).conversation.id == conv.id


def test_a_background_response_joins_when_it_ends(srv: LiveServer) -> None:
    client = api(srv)
    conv = client.conversations.create(items=[ADA])
    made = client.responses.create(
        model=MODEL, input="Hi", conversation=conv.id, background=True, max_output_tokens=4
    )
    assert made.conversation.id == conv.id
    done = finished(client, made.id)
    assert done.status in ("completed", "incomplete") and done.conversation.id == conv.id
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [i.id for i in items[2:]] == [o.id for o in done.output]
    assert items[1].content[0].text == "Hi"


def test_logprobs_are_listed_when_included(srv: LiveServer) -> None:
    client = api(srv)
    conv = client.conversations.create()
    r = client.responses.create(
        model=MODEL, input="x", conversation=conv.id, top_logprobs=1,
        include=["message.output_text.logprobs"], **CUT,
    )  # fmt: skip
    n = r.usage.output_tokens
    plain = client.conversations.items.list(conv.id).data[0]
    assert plain.role == "assistant" and plain.content[0].logprobs == []
    kept = client.conversations.items.list(conv.id, include=["message.output_text.logprobs"])
    assert len(kept.data[0].content[0].logprobs) == n == 8
    one = client.conversations.items.retrieve(
        plain.id, conversation_id=conv.id, include=["message.output_text.logprobs"]
    )
    assert len(one.content[0].logprobs) == n


def test_another_project_finds_none_of_it(srv: LiveServer) -> None:
    mine, theirs = api(srv, A), api(srv, B)
    conv = mine.conversations.create(items=[ADA], metadata={"k": "v"})
    item = mine.conversations.items.list(conv.id).data[0].id
    for call in (
        lambda: theirs.conversations.retrieve(conv.id),
        lambda: theirs.conversations.update(conv.id, metadata={}),
        lambda: theirs.conversations.delete(conv.id),
        lambda: theirs.conversations.items.list(conv.id),
        lambda: theirs.conversations.items.create(conv.id, items=[user("x")]),
        lambda: theirs.conversations.items.retrieve(item, conversation_id=conv.id),
        lambda: theirs.conversations.items.delete(item, conversation_id=conv.id),
        lambda: theirs.responses.create(model=MODEL, input="x", conversation=conv.id),
        lambda: theirs.responses.input_tokens.count(model=MODEL, conversation=conv.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert mine.conversations.retrieve(conv.id).metadata == {"k": "v"}
    assert ids(mine, conv.id) == [item]


@pytest.mark.parametrize(
    "route,body,param",
    [
        ("/v1/conversations", {"items": [user("x")] * 21}, "items"),
        ("/v1/conversations", {"items": [{"type": "image_generation_call"}]}, "items"),
        ("/v1/conversations", {"items": [{"role": "tool", "content": "x"}]}, "items"),
        ("/v1/conversations", {"items": [{**ADA, "id": "m"}, {**ADA, "id": "m"}]}, "items"),
        ("/v1/conversations", {"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ("/v1/conversations", {"metadata": {"k": "v" * 513}}, "metadata"),
        ("/v1/conversations", {"bogus": 1}, "bogus"),
        ("{conv}/items", {"items": []}, "items"),
        ("{conv}/items", {"items": [user("x")] * 21}, "items"),
        ("{conv}/items", {"items": [{"type": "function_call", "name": "f"}]}, "items"),
        ("{conv}/items", {"items": [{**ADA, "id": "taken"}]}, "items"),
        ("{conv}", {"metadata": {"k": 1}}, "metadata"),
        ("/v1/responses", {"conversation": "{id}", "previous_response_id": "resp_1"},
         "conversation"),
        ("/v1/responses", {"conversation": {"name": "x"}}, "conversation"),
        ("/v1/responses", {"conversation": "{id}", "input": [{**ADA, "id": "taken"}]}, "input"),
        ("/v1/responses", {"conversation": "{id}", "input": []}, "input"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_field(
    srv: LiveServer, route: str, body: dict, param: str
) -> None:
    client, h = api(srv), http(srv)
    conv = client.conversations.create(items=[{**ADA, "id": "taken"}])
    path = route.replace("{conv}", f"/v1/conversations/{conv.id}")
    if path == "/v1/responses":
        body = {"model": MODEL, "input": "x", "max_output_tokens": 2, **body}
        if body["conversation"] == "{id}":
            body["conversation"] = conv.id
    r = h.post(path, json=body)
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"].startswith(param), r.json()
    if "Duplicate" in r.json()["error"]["message"]:
        assert "Remove duplicate items" in r.json()["error"]["message"]
    assert ids(client, conv.id) == ["taken"]


def test_bad_queries_and_unknown_ids(srv: LiveServer) -> None:
    client, h = api(srv), http(srv)
    conv = client.conversations.create(items=[ADA])
    items = f"/v1/conversations/{conv.id}/items"
    for params, param in (
        ({"after": "nope"}, "after"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"order": "up"}, "order"),
        ({"include": "bogus"}, "include"),
        ({"include[]": "bogus"}, "include"),
    ):
        r = h.get(items, params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (params, r.text)
    for method, path in (
        ("GET", "/v1/conversations/conv_nope"),
        ("POST", "/v1/conversations/conv_nope"),
        ("DELETE", "/v1/conversations/conv_nope"),
        ("GET", "/v1/conversations/conv_nope/items"),
        ("GET", f"{items}/msg_nope"),
        ("DELETE", f"{items}/msg_nope"),
    ):
        body = {"metadata": {}} if method == "POST" else None
        r = h.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert_valid(r.json(), "ErrorResponse")
    unknown = {"model": MODEL, "input": "x", "conversation": "conv_nope"}
    r = httpx.post(srv.url + "/v1/responses", json=unknown, headers=h.headers, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "conversation"
