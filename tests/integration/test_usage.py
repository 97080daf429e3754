"""OpenAI's usage API on a live server with two member keys and an admin key: every kind of
request (chat, completions, responses, streamed or not, embeddings) is counted for its
project, key and model with the tokens its own answer reported; buckets, filters, group_by
and pages as OpenAI gives them; members get 403; bad queries 400; counts survive a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from genserve.api.auth import env_principal
from tests.conformance import assert_valid
from tests.server import LiveServer, start_server

A, B, ADMIN = "sk-use-a", "sk-use-b", "sk-use-admin"
MODEL, EMBED = "tiny-llama", "all-MiniLM-L6-v2"
PATH = "/v1/organization/usage/"


def start(tiny_model_dir: Path, root: Path, *extra: str) -> LiveServer:
    (root / "logs").mkdir(parents=True, exist_ok=True)
    env = {"GENSERVE_API_KEYS": f"{A},{B}", "GENSERVE_ADMIN_KEYS": ADMIN}
    args = ("--data-dir", str(root / "data"), "--max-batch-size", "8", *extra)
    return start_server(tiny_model_dir, root / "logs", *args, env=env)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("usage")


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, root: Path) -> LiveServer:
    live = start(tiny_model_dir, root, "--embedding-model", EMBED)
    yield live
    live.stop()


def api(srv: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def report(srv: LiveServer, kind: str, key: str = ADMIN, **params) -> httpx.Response:
    params.setdefault("start_time", int(time.time()) - 3600)
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(srv.url + PATH + kind, params=params, headers=headers, timeout=30)


def totals(page: dict) -> list[dict]:
    return [r for b in page["data"] for r in b["results"]]


def key_id(key: str) -> str:
    """A key's id as the usage API names it (`env-` and its hash's start, for a key from the
    environment)."""
    return env_principal(key, "member").key_id


@pytest.fixture(scope="module")
def spent(srv: LiveServer) -> dict:
    """Requests of every kind from A, one from B; what their answers reported."""
    a, b = api(srv, A), api(srv, B)
    seen = {"input": 0, "output": 0, "requests": 0}

    def count(usage_in: int, usage_out: int) -> None:
        seen["input"] += usage_in
        seen["output"] += usage_out
        seen["requests"] += 1

    chat = a.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=5)  # fmt: skip
    count(chat.usage.prompt_tokens, chat.usage.completion_tokens)
    text = a.completions.create(model=MODEL, prompt=["one", "two three"], max_tokens=4, n=2)
    count(text.usage.prompt_tokens, text.usage.completion_tokens)
    streamed = a.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    last = [c for c in streamed][-1]
    count(last.usage.prompt_tokens, last.usage.completion_tokens)
    resp = a.responses.create(model=MODEL, input="hello", max_output_tokens=5)
    count(resp.usage.input_tokens, resp.usage.output_tokens)
    # The embeddings model loads after the server is ready: 503 with Retry-After until then.
    emb = a.with_options(max_retries=20).embeddings.create(model=EMBED, input=["a b c", "d"])
    other = b.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                      max_tokens=3)  # fmt: skip
    return {"a": seen, "a_embed": emb.usage.prompt_tokens, "b_input": other.usage.prompt_tokens,
            "b_output": other.usage.completion_tokens}  # fmt: skip


def test_every_request_is_counted_for_its_key(srv: LiveServer, spent: dict) -> None:
    page = report(srv, "completions", group_by=["api_key_id", "model"])
    assert page.status_code == 200, page.text
    body = page.json()
    assert_valid(body, "UsageResponse")
    rows = totals(body)
    a = key_id(A)
    mine = [r for r in rows if r["api_key_id"] == a]
    assert len(mine) == 1 and mine[0]["model"] == MODEL
    assert mine[0]["input_tokens"] == spent["a"]["input"]
    assert mine[0]["output_tokens"] == spent["a"]["output"]
    assert mine[0]["num_model_requests"] == spent["a"]["requests"]
    others = [r for r in rows if r["api_key_id"] not in (a, None)]
    assert [(r["input_tokens"], r["output_tokens"]) for r in others] == [
        (spent["b_input"], spent["b_output"])
    ]
    embedded = report(srv, "embeddings", group_by="api_key_id", api_key_ids=a).json()
    assert_valid(embedded, "UsageResponse")
    assert [(r["input_tokens"], r["num_model_requests"]) for r in totals(embedded)] == [
        (spent["a_embed"], 1)
    ]


def test_buckets_filters_and_pages(srv: LiveServer, spent: dict) -> None:
    now = int(time.time())
    start = now - 5 * 60
    first = report(srv, "completions", start_time=start, bucket_width="1m", limit=2).json()
    assert len(first["data"]) == 2 and first["has_more"]
    assert first["data"][0]["start_time"] == start // 60 * 60
    assert all(b["end_time"] - b["start_time"] == 60 for b in first["data"])
    pages, page = [first], first
    while page["has_more"]:
        page = report(srv, "completions", start_time=start, bucket_width="1m", limit=2,
                      page=page["next_page"]).json()  # fmt: skip
        pages.append(page)
    starts = [b["start_time"] for p in pages for b in p["data"]]
    assert starts == sorted(set(starts)) and starts[-1] <= now < starts[-1] + 60
    total = sum(r["num_model_requests"] for p in pages for r in totals(p))
    day = totals(report(srv, "completions", start_time=start).json())
    assert total == sum(r["num_model_requests"] for r in day) >= spent["a"]["requests"] + 1
    assert totals(report(srv, "completions", models="no-such-model").json()) == []
    assert totals(report(srv, "completions", batch="true").json()) == []
    ungrouped = totals(report(srv, "completions").json())
    assert len(ungrouped) == 1 and ungrouped[0]["api_key_id"] is None


def test_members_get_403_and_bad_queries_400(srv: LiveServer, spent: dict) -> None:
    assert report(srv, "completions", key=A).status_code == 403
    bad = [
        ({"start_time": "yesterday"}, "start_time"),
        ({"bucket_width": "2d"}, "bucket_width"),
        ({"limit": 1441, "bucket_width": "1m"}, "limit"),
        ({"limit": 0}, "limit"),
        ({"group_by": "colour"}, "group_by"),
        ({"end_time": 5, "start_time": 10}, "end_time"),
        ({"page": "page_abc"}, "page"),
        ({"batch": "maybe"}, "batch"),
    ]
    for params, param in bad:
        r = report(srv, "completions", **params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (params, r.text)
    r = httpx.get(srv.url + PATH + "completions", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "start_time"
    assert report(srv, "embeddings", group_by="batch").status_code == 400


def test_counts_survive_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    live = start(tiny_model_dir, tmp_path)
    try:
        chat = api(live, A).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    finally:
        live.stop()  # within the flush interval: the shutdown writes it
    live = start(tiny_model_dir, tmp_path)
    try:
        rows = totals(report(live, "completions").json())
        assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [
            (chat.usage.prompt_tokens, chat.usage.completion_tokens)
        ]
    finally:
        live.stop()
