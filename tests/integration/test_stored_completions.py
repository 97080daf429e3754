"""Stored chat completions (`store: true`) on a live server with the official client: what was
answered, streamed or not, comes back from retrieve and list (filtered by model and metadata,
paged both ways), its request's messages from messages.list; metadata can be changed, the
completion deleted; another project's key sees none of it; bad input is a 400."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server

MODEL = "tiny-llama"
A, B = "sk-store-a", "sk-store-b"  # each key its own project
SEED = {"seed": 7}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    env = {"GENSERVE_API_KEYS": f"{A},{B}"}
    logs = tmp_path_factory.mktemp("store-logs")
    live = start_server(tiny_model_dir, logs, "--max-model-len", "128", env=env)
    yield live
    live.stop()


def client(srv: LiveServer, key: str = A) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def ask(api: openai.OpenAI, text: str, **kw):  # noqa: ANN003, ANN201
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    return api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, extra_body=SEED, **kw
    )


@pytest.fixture(scope="module")
def stored(srv: LiveServer) -> dict:
    """Three stored answers (one streamed, with n=2) and one that is not stored."""
    api = client(srv)
    plain = ask(api, "one", store=True, metadata={"topic": "math", "run": "1"})
    ask(api, "not kept")  # store left out: kept nowhere
    two = ask(api, "two", store=True, metadata={"topic": "poetry"})
    chunks = list(ask(api, "three", store=True, stream=True, n=2, metadata={"topic": "math"}))
    texts = ["", ""]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    return {"plain": plain, "two": two, "streamed_id": chunks[0].id, "streamed_texts": texts}


def test_what_was_answered_comes_back(srv: LiveServer, stored: dict) -> None:
    api = client(srv)
    plain = stored["plain"]
    got = api.chat.completions.retrieve(plain.id)
    assert got.choices[0].message.content == plain.choices[0].message.content
    assert got.usage == plain.usage and got.system_fingerprint == plain.system_fingerprint
    assert got.metadata == {"topic": "math", "run": "1"}
    raw = httpx.get(f"{srv.url}/v1/chat/completions/{plain.id}", headers=auth(A)).json()
    assert_valid(raw, "CreateChatCompletionResponse")
    # A stream is stored whole once it ends: each choice's text as the deltas spelled it.
    streamed = api.chat.completions.retrieve(stored["streamed_id"])
    assert [c.message.content for c in streamed.choices] == stored["streamed_texts"]
    assert streamed.object == "chat.completion" and streamed.usage.completion_tokens == 12


def test_list_filters_and_pages(srv: LiveServer, stored: dict) -> None:
    api = client(srv)
    ids = [stored["plain"].id, stored["two"].id, stored["streamed_id"]]
    assert [c.id for c in api.chat.completions.list()] == ids  # oldest first; "not kept" absent
    assert [c.id for c in api.chat.completions.list(order="desc")] == ids[::-1]
    math = api.chat.completions.list(metadata={"topic": "math"})
    assert [c.id for c in math] == [ids[0], ids[2]]
    both = api.chat.completions.list(metadata={"topic": "math", "run": "1"})
    assert [c.id for c in both] == [ids[0]]
    assert [c.id for c in api.chat.completions.list(model="other")] == []
    assert [c.id for c in api.chat.completions.list(model=MODEL)] == ids
    page = api.chat.completions.list(limit=1)
    assert [c.id for c in page.data] == ids[:1] and page.has_more
    walked = [c.id for c in api.chat.completions.list(limit=1)]  # auto-paging follows `after`
    assert walked == ids
    after = api.chat.completions.list(after=ids[1], order="desc")
    assert [c.id for c in after] == ids[:1]
    raw = httpx.get(f"{srv.url}/v1/chat/completions", headers=auth(A)).json()
    assert_valid(raw, "ChatCompletionList")


def test_messages_list_the_request(srv: LiveServer, stored: dict) -> None:
    api = client(srv)
    cid = stored["plain"].id
    messages = api.chat.completions.messages.list(cid)
    pairs = [(m.role, m.content) for m in messages.data]
    assert pairs == [("system", "Be brief."), ("user", "one")]
    assert [m.id for m in messages.data] == [f"{cid}-0", f"{cid}-1"]
    newest = api.chat.completions.messages.list(cid, order="desc", limit=1)
    assert [m.content for m in newest.data] == ["one"] and newest.has_more


def test_metadata_changes_and_delete_removes(srv: LiveServer) -> None:
    api = client(srv)
    c = ask(api, "four", store=True, metadata={"a": "1"})
    updated = api.chat.completions.update(c.id, metadata={"label": "good"})
    assert updated.metadata == {"label": "good"} and updated.id == c.id
    assert [x.id for x in api.chat.completions.list(metadata={"label": "good"})] == [c.id]
    deleted = api.chat.completions.delete(c.id)
    assert deleted.deleted and deleted.id == c.id and deleted.object == "chat.completion.deleted"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.retrieve(c.id)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.delete(c.id)


def test_another_project_sees_none_of_it(srv: LiveServer, stored: dict) -> None:
    other = client(srv, B)
    cid = stored["plain"].id
    assert [c.id for c in other.chat.completions.list()] == []
    for call in (
        lambda: other.chat.completions.retrieve(cid),
        lambda: other.chat.completions.update(cid, metadata={"x": "y"}),
        lambda: other.chat.completions.delete(cid),
        lambda: other.chat.completions.messages.list(cid),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client(srv).chat.completions.retrieve(cid).metadata == {"topic": "math", "run": "1"}


@pytest.mark.parametrize(
    "method,path,body,param",
    [
        *[("POST", CHAT, {"store": True, "metadata": m}, "metadata") for m in (
            {f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513})],
        ("POST", CHAT, {"store": "yes please"}, "store"),
        ("GET", CHAT + "?limit=0", None, "limit"),
        ("GET", CHAT + "?order=sideways", None, "order"),
        ("POST", CHAT + "/chatcmpl-x", {"metadata": {"a": "b"}, "store": True}, "store"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400(
    srv: LiveServer, method: str, path: str, body: dict | None, param: str
) -> None:
    if body is not None and path == CHAT:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **body}
    r = httpx.request(method, srv.url + path, json=body, headers=auth(A), timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"].startswith(param), error


def test_unknown_ids_are_openai_404s(srv: LiveServer) -> None:
    r = httpx.get(f"{srv.url}/v1/chat/completions/chatcmpl-nope/messages", headers=auth(A))
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "Chat completion with id 'chatcmpl-nope' not found."
    r = httpx.get(f"{srv.url}/v1/chat/completions?after=chatcmpl-nope", headers=auth(A))
    assert r.status_code == 200 and r.json()["data"] == []


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_export_writes_a_fine_tuning_file(srv: LiveServer, stored: dict, tmp_path: Path) -> None:
    """`genserve completions export`: the matching answers as chat training lines, which the
    fine-tuning check takes; answers cut by max_tokens stay out unless asked for."""
    from typer.testing import CliRunner

    from genserve.cli import app
    from genserve.training.dataset import check_file

    out = tmp_path / "math.jsonl"
    base = ["completions", "export", "--base-url", srv.url, "--api-key", A, "--output", str(out)]
    cut = CliRunner().invoke(app, [*base, "--metadata", "topic=math"])
    streamed = client(srv).chat.completions.retrieve(stored["streamed_id"])
    reasons = [stored["plain"].choices[0].finish_reason, streamed.choices[0].finish_reason]
    kept = sum(r in ("stop", "tool_calls") for r in reasons)
    assert cut.exit_code == 0, cut.output
    assert len(out.read_text().splitlines()) == kept
    every = CliRunner().invoke(app, [*base, "--metadata", "topic=math", "--include-cut"])
    assert every.exit_code == 0 and "2 examples" in every.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    plain = stored["plain"].choices[0].message.content
    assert lines[0] == {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": plain},
    ]}  # fmt: skip
    assert lines[1]["messages"][-1]["content"] == stored["streamed_texts"][0]  # choice 0
    assert check_file(out).examples == 2
    refused = CliRunner().invoke(app, [*base, "--metadata", "topic"])
    assert refused.exit_code != 0 and "KEY=VALUE" in refused.output
    denied = CliRunner().invoke(app, [*base[:4], "--api-key", "sk-wrong", "--output", str(out)])
    assert denied.exit_code == 1 and "401" in denied.output
