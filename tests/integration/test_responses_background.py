"""Background responses and input token counts with the official client, on a live server.

`background: true` answers at once and runs on apart from its request: polled to its end, its
stream followed, left and resumed from a sequence number, cancelled (queued or mid-way: the
engine's requests are aborted), and per project. A server killed mid-response fails it at the
next start; a SIGTERM's drain finishes it, and past --drain-timeout fails it.

To hold a response queued or in progress without timing, the tests stop the engine's process
(SIGSTOP) and let it go on (SIGCONT): the API process keeps answering meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server, wait_until

MODEL = "tiny-llama"
A, B = "key-a", "key-b"  # two member keys: two projects
RUNNING = ("queued", "in_progress")
SEED = {"seed": 11}
LONG = {"max_output_tokens": 300, "extra_body": {"ignore_eos": True}}  # runs to its limit
TOOL = {
    "type": "function", "name": "get_point", "strict": True,
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                   "required": ["x"], "additionalProperties": False},
}  # fmt: skip


def serve(model_dir: Path, logs: Path, *args: str) -> LiveServer:
    return start_server(model_dir, logs, *args, env={"GENSERVE_API_KEYS": f"{A},{B}"})


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    live = serve(tiny_model_dir, tmp_path_factory.mktemp("bg"), "--max-batch-size", "8")
    yield live
    live.stop()


def api(srv: LiveServer, key: str = A) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def http(srv: LiveServer, key: str = A) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.Client(base_url=srv.url, headers=headers, timeout=120)


def engine_pid(srv: LiveServer) -> int:
    pid = httpx.get(srv.url + "/health").json()["models"][MODEL]["engine_pid"]
    assert pid != srv.proc.pid  # the engine runs in a process of its own
    return pid


@contextlib.contextmanager
def engine_paused(srv: LiveServer) -> Iterator[None]:
    pid = engine_pid(srv)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def engine_idle(srv: LiveServer) -> bool:
    stats = httpx.get(srv.url + "/health").json()["models"][MODEL]
    return stats["running"] == 0 and stats["waiting"] == 0


def finished(client: openai.OpenAI, response_id: str):  # noqa: ANN201
    def ended():  # noqa: ANN202
        r = client.responses.retrieve(response_id)
        return r if r.status not in RUNNING else None

    return wait_until(ended, 120)


def sse(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[6:])


def test_polled_to_the_end_it_is_the_answer_a_plain_call_gives(srv: LiveServer) -> None:
    client = api(srv)
    kw = dict(model=MODEL, input="hello", max_output_tokens=12, extra_body=SEED)
    made = client.responses.with_raw_response.create(background=True, **kw).http_response.json()
    assert_valid(made, "Response")
    assert made["status"] in RUNNING and made["background"] is True and made["output"] == []
    done = finished(client, made["id"])
    plain = client.responses.create(**kw)
    assert done.background is True and plain.background is False
    assert (done.status, done.output_text) == (plain.status, plain.output_text)
    assert done.usage.output_tokens == plain.usage.output_tokens
    assert_valid(http(srv).get(f"/v1/responses/{done.id}").json(), "Response")
    # What a continuation sees is its whole output, as for a plain one.
    follow = client.responses.create(
        model=MODEL, input="more", previous_response_id=done.id, max_output_tokens=2
    )
    again = client.responses.create(
        model=MODEL, input="more", previous_response_id=plain.id, max_output_tokens=2
    )
    assert follow.usage.input_tokens == again.usage.input_tokens


def test_a_stream_left_runs_on_and_resumes_after_its_cursor(srv: LiveServer) -> None:
    client, pid = api(srv), engine_pid(srv)
    seen = first_delta(srv, {"input": "hi", "max_output_tokens": 200})
    try:  # left mid-way (the engine held), and picked up from its cursor while it runs
        response_id, cursor = seen[0]["response"]["id"], seen[-1]["sequence_number"]
        assert client.responses.retrieve(response_id).status == "in_progress"
        follower = client.responses.retrieve(response_id, stream=True, starting_after=cursor)
    finally:
        os.kill(pid, signal.SIGCONT)
    live = list(follower)
    assert [e["type"] for e in seen[:3]] == [
        "response.created", "response.queued", "response.in_progress",
    ]  # fmt: skip
    assert seen[0]["response"]["status"] == "queued"
    done = finished(client, response_id)
    # It ran on after its client left: to its max_output_tokens.
    assert done.status == "incomplete" and done.usage.output_tokens == 200
    assert [e.sequence_number for e in live] == list(range(cursor + 1, cursor + 1 + len(live)))
    assert live[-1].type == "response.incomplete"
    assert text_of(seen) + text_of([e.model_dump() for e in live]) == done.output_text
    # Once it has ended, its events come from the store: all of them, or those after a cursor.
    replayed = [e.model_dump() for e in client.responses.retrieve(response_id, stream=True)]
    assert [e["sequence_number"] for e in replayed] == list(range(len(replayed)))
    assert [e.model_dump() for e in live] == replayed[cursor + 1 :]
    with http(srv) as h, h.stream("GET", f"/v1/responses/{response_id}?stream=true") as r:
        for event in sse(r.iter_lines()):
            assert_valid(event, "ResponseStreamEvent")


def first_delta(srv: LiveServer, body: dict) -> list[dict]:
    """Stream a background response until its first text, hold the engine there (SIGSTOP: the
    caller lets it go on), and leave: its events so far."""
    body = {"model": MODEL, "stream": True, "background": True, "ignore_eos": True, **body}
    seen, pid = [], engine_pid(srv)
    with http(srv) as h, h.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        for event in sse(r.iter_lines()):
            seen.append(event)
            if event["type"] == "response.output_text.delta":
                os.kill(pid, signal.SIGSTOP)
                return seen
    raise AssertionError(f"no text came: {seen[-1:]}")


def text_of(events: list[dict]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_a_queued_response_is_cancelled_once_and_its_engine_work_dropped(
    srv: LiveServer,
) -> None:
    client = api(srv)
    with engine_paused(srv):
        queued = client.responses.create(model=MODEL, input="x", background=True, **LONG)
        doomed = client.responses.create(model=MODEL, input="y", background=True, **LONG)
        assert client.responses.retrieve(queued.id).status == "queued"
        with pytest.raises(openai.BadRequestError) as caught:  # nothing to continue from yet
            client.responses.create(model=MODEL, input="z", previous_response_id=queued.id)
        assert caught.value.body["param"] == "previous_response_id"
        cancelled = client.responses.with_raw_response.cancel(queued.id).http_response.json()
        assert_valid(cancelled, "Response")
        assert cancelled["status"] == "cancelled" and cancelled["output"] == []
        assert client.responses.cancel(queued.id).status == "cancelled"  # idempotent
        client.responses.delete(doomed.id)  # a running one is cancelled, then deleted
    wait_until(lambda: engine_idle(srv), 60)  # both aborted in the engine, not run
    assert client.responses.retrieve(queued.id).status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(doomed.id)
    # Its events end where it stopped: OpenAI's stream has no event for a cancel.
    replayed = list(client.responses.retrieve(queued.id, stream=True))
    assert [e.type for e in replayed] == ["response.created", "response.queued"]


def test_cancelled_mid_way_it_keeps_what_it_wrote(srv: LiveServer) -> None:
    client, pid = api(srv), engine_pid(srv)
    body = {"model": MODEL, "input": "hi", "stream": True, "background": True,
            "max_output_tokens": 300, "ignore_eos": True}  # fmt: skip
    with http(srv) as h, h.stream("POST", "/v1/responses", json=body) as r:
        events = sse(r.iter_lines())
        seen = []
        for event in events:
            seen.append(event)
            if event["type"] == "response.output_text.delta":
                break
        os.kill(pid, signal.SIGSTOP)
        try:
            response_id = seen[0]["response"]["id"]
            assert client.responses.retrieve(response_id).status == "in_progress"
            cancelled = client.responses.cancel(response_id)
            rest = list(events)  # its follower ends: a cancel sends no event (as OpenAI's)
        finally:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: engine_idle(srv), 60)  # aborted in the engine
    assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 300
    assert not any(e["type"].startswith("response.") and "response" in e for e in rest)
    assert cancelled.output_text == text_of(seen + rest) != ""
    assert cancelled.output[0].status == "incomplete"
    assert client.responses.retrieve(response_id).model_dump() == cancelled.model_dump()


def test_what_cannot_be_cancelled_or_resumed_is_a_400(srv: LiveServer) -> None:
    client = api(srv)
    plain = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="synchronous"):
        client.responses.cancel(plain.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.retrieve(plain.id, stream=True)
    assert caught.value.body["param"] == "stream"
    done = finished(client, client.responses.create(
        model=MODEL, input="x", max_output_tokens=2, background=True).id)  # fmt: skip
    article = "an" if done.status == "incomplete" else "a"
    with pytest.raises(openai.BadRequestError, match=f"Cannot cancel {article} {done.status} "):
        client.responses.cancel(done.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="x", background=True, store=False)
    assert caught.value.body["param"] == "store"
    with http(srv) as h:
        for bad in ("x", str(10**30)):
            params = {"stream": "true", "starting_after": bad}
            r = h.get(f"/v1/responses/{done.id}", params=params)
            assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"
        r = h.post("/v1/responses/input_tokens", json={"input": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = h.post("/v1/responses/input_tokens", json={"model": MODEL, "tools": [{"type": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_another_project_finds_none_of_it(srv: LiveServer) -> None:
    mine, theirs = api(srv, A), api(srv, B)
    with engine_paused(srv):
        made = mine.responses.create(model=MODEL, input="x", background=True, **LONG)
        for call in (
            lambda: theirs.responses.retrieve(made.id),
            lambda: list(theirs.responses.retrieve(made.id, stream=True)),
            lambda: theirs.responses.cancel(made.id),
            lambda: theirs.responses.delete(made.id),
            lambda: theirs.responses.input_items.list(made.id),
            lambda: theirs.responses.input_tokens.count(
                model=MODEL, input="y", previous_response_id=made.id
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert mine.responses.cancel(made.id).status == "cancelled"
    wait_until(lambda: engine_idle(srv), 60)


def test_input_tokens_count_the_prompt_a_response_runs(srv: LiveServer) -> None:
    client = api(srv)
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4)
    bodies = [
        {"input": "Say hi"},
        {"input": "Say hi", "instructions": "Be brief.", "tools": [TOOL]},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}],
         "tools": [TOOL], "tool_choice": "none"},
        {"input": "What is my name?", "previous_response_id": first.id},
    ]  # fmt: skip
    for body in bodies:
        counted = client.responses.input_tokens.count(model=MODEL, **body)
        assert counted.object == "response.input_tokens"
        ran = client.responses.create(model=MODEL, max_output_tokens=1, **body)
        assert counted.input_tokens == ran.usage.input_tokens, body
    raw = http(srv).post("/v1/responses/input_tokens", json={"model": MODEL, "input": "x"})
    assert_valid(raw.json(), "TokenCountsResource")


def test_a_killed_server_fails_what_ran_and_a_drain_lets_it_finish(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = tmp_path_factory.mktemp("bg-restart")
    data = ("--data-dir", str(logs / "data"))
    live = serve(tiny_model_dir, logs, *data)
    pid = engine_pid(live)
    try:
        os.kill(pid, signal.SIGSTOP)  # held queued until the kill
        made = api(live).responses.create(model=MODEL, input="x", background=True, **LONG)
    finally:
        os.kill(live.proc.pid, signal.SIGKILL)  # no drain, no shutdown
        live.proc.wait()
        os.kill(pid, signal.SIGKILL)  # a stopped engine cannot see its parent go

    live = serve(tiny_model_dir, logs, *data)
    try:
        client = api(live)
        failed = client.responses.retrieve(made.id)
        assert failed.status == "failed" and failed.error.code == "server_error"
        assert "stopped before this response finished" in failed.error.message
        resumed = list(client.responses.retrieve(made.id, stream=True, starting_after=1))
        assert [e.type for e in resumed] == ["response.failed"]  # whatever a client saw
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a failed response"):
            client.responses.cancel(made.id)
        # SIGTERM's drain waits for a background response as for a stream.
        pid = engine_pid(live)
        drained = first_delta(live, {"input": "y", "max_output_tokens": 300})[0]["response"]
        try:
            live.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining (" in live.log(), 60)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert live.proc.wait(timeout=120) == 0
    finally:
        live.stop()

    live = serve(tiny_model_dir, logs, *data, "--drain-timeout", "0")
    try:
        client = api(live)
        done = client.responses.retrieve(drained["id"])
        assert done.status == "incomplete" and done.usage.output_tokens == 300
        # Past --drain-timeout it is cut: failed, saying why, to whoever follows it too.
        pid = engine_pid(live)
        seen = first_delta(live, {"input": "z", "max_output_tokens": 300})
        try:
            cursor = seen[-1]["sequence_number"]
            follower = client.responses.retrieve(
                seen[0]["response"]["id"], stream=True, starting_after=cursor
            )
            live.proc.send_signal(signal.SIGTERM)
            last = list(follower)[-1]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert live.proc.wait(timeout=60) == 0
    finally:
        live.stop()
    assert last.type == "response.failed" and last.response.status == "failed"
    assert "drain timeout" in last.response.error.message
