"""/v1/batches on a live server with the official openai client: a file of requests runs to an
output and an error file in OpenAI's shapes; a malformed file fails naming its lines; cancel
keeps what finished; embeddings batch too; a batch is its project's alone; a seeded request
answers as online; and a server killed with SIGKILL mid-batch finishes it after a restart with
every custom_id exactly once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from genserve.api.auth import env_principal
from tests.conformance import assert_valid
from tests.server import LiveServer, start_server, wait_until

MODEL = "tiny-llama"
EMBEDDER = "all-MiniLM-L6-v2"
A, B = "sk-a", "sk-b"  # two member keys: two projects
ADMIN = "sk-batch-admin"  # reads the usage API
TERMINAL = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"


def chat_line(i: int, **body: object) -> dict:
    messages = [{"role": "user", "content": f"Count to {i}."}]
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": MODEL, "messages": messages, "max_tokens": 4, **body},
    }


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch-data")


def serve(tiny_model_dir: Path, logs: Path, data_dir: Path, *extra: str) -> LiveServer:
    env = {"GENSERVE_API_KEYS": f"{A},{B}", "GENSERVE_ADMIN_KEYS": ADMIN}
    # 16 slots: a quarter of them (4) run batch work.
    args = ("--max-batch-size", "16", "--max-model-len", "128", "--data-dir", str(data_dir))
    return start_server(tiny_model_dir, logs, *args, *extra, env=env)


@pytest.fixture(scope="module")
def srv(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> LiveServer:
    live = serve(
        tiny_model_dir, tmp_path_factory.mktemp("batch-logs"), data_dir,
        "--embedding-model", EMBEDDER,
    )  # fmt: skip
    yield live
    live.stop()


def api(srv: LiveServer, key: str = A) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def raw(srv: LiveServer, key: str = A) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def create(srv: LiveServer, lines: list[dict] | bytes, endpoint: str = CHAT) -> dict:
    client = api(srv)
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.with_raw_response.create(
        input_file_id=f.id, endpoint=endpoint, completion_window="24h", metadata={"k": "v"}
    )
    card = batch.http_response.json()
    assert_valid(card, "Batch")
    return card


def card(srv: LiveServer, batch_id: str) -> dict:
    body = raw(srv).get(f"/v1/batches/{batch_id}").json()
    assert_valid(body, "Batch")  # every Batch object we see, at every status
    return body


def wait_done(srv: LiveServer, batch_id: str, timeout: float = 240) -> dict:
    return wait_until(
        lambda: (c := card(srv, batch_id))["status"] in TERMINAL and c, timeout, every=0.2
    )


def lines_of(srv: LiveServer, file_id: str) -> list[dict]:
    text = api(srv).files.content(file_id).read().decode()
    return [json.loads(x) for x in text.splitlines()]


def test_chat_batch_runs_good_lines_and_reports_bad_ones(srv: LiveServer) -> None:
    lines = [chat_line(i) for i in range(50)]
    lines[7]["body"]["model"] = "no-such-model"  # unknown model: 404 in the error file
    lines[31]["body"]["temperature"] = 5  # out of range: 400, as online
    created = create(srv, lines)
    assert created["status"] in ("validating", "in_progress")
    assert created["id"].startswith("batch_") and created["metadata"] == {"k": "v"}

    done = wait_done(srv, created["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 50, "completed": 48, "failed": 2}
    assert {"in_progress_at", "finalizing_at", "completed_at"} <= done.keys()
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0

    out = lines_of(srv, done["output_file_id"])
    good = {f"req-{i}" for i in range(50)} - {"req-7", "req-31"}
    assert sorted(x["custom_id"] for x in out) == sorted(good)  # each once
    for x in out:
        assert x["response"]["status_code"] == 200 and x["error"] is None
        assert_valid(x["response"]["body"], "CreateChatCompletionResponse")

    errors = {x["custom_id"]: x["response"] for x in lines_of(srv, done["error_file_id"])}
    assert errors.keys() == {"req-7", "req-31"}
    assert errors["req-7"]["status_code"] == 404
    assert errors["req-7"]["body"]["error"]["code"] == "model_not_found"
    assert errors["req-31"]["status_code"] == 400
    assert errors["req-31"]["body"]["error"]["param"] == "temperature"
    for e in errors.values():
        assert_valid(e["body"], "ErrorResponse")

    # The official client reads it, and lists it, newest first, page by page.
    client = api(srv)
    assert client.batches.retrieve(created["id"]).request_counts.completed == 48
    listing = raw(srv).get("/v1/batches", params={"limit": 1}).json()
    assert_valid(listing, "ListBatchesResponse")
    first = client.batches.list(limit=1)
    assert len(first.data) == 1 and first.has_more in (True, False)


def test_malformed_file_fails_naming_its_lines(srv: LiveServer) -> None:
    wrong_url = {**chat_line(3), "url": "/v1/completions"}
    data = jsonl([chat_line(1)]) + b"{not json\n" + jsonl([wrong_url, chat_line(1)])
    done = wait_done(srv, create(srv, data)["id"])
    assert done["status"] == "failed" and "failed_at" in done
    found = {(e["line"], e["code"]) for e in done["errors"]["data"]}
    assert found == {(2, "invalid_json_line"), (3, "invalid_url"), (4, "duplicate_custom_id")}
    assert done["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert "output_file_id" not in done


def test_create_checks_what_it_names(srv: LiveServer) -> None:
    client = api(srv)
    tuned = client.files.create(
        file=("t.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, '
              b'{"role": "assistant", "content": "yo"}]}\n'),
        purpose="fine-tune",
    )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.batches.create(input_file_id=tuned.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    f = client.files.create(file=("in.jsonl", jsonl([chat_line(1)])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_a_request_over_the_context_fails_alone(srv: LiveServer) -> None:
    done = wait_done(srv, create(srv, [chat_line(1), chat_line(2, max_tokens=500)])["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    (error,) = lines_of(srv, done["error_file_id"])
    assert error["custom_id"] == "req-2" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_cancel_mid_batch_keeps_what_finished(srv: LiveServer) -> None:
    lines = [chat_line(i, max_tokens=48, ignore_eos=True) for i in range(300)]
    batch_id = create(srv, lines)["id"]
    wait_until(lambda: card(srv, batch_id)["request_counts"]["completed"] >= 2, 120, every=0.1)
    cancelled = api(srv).batches.cancel(batch_id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_done(srv, batch_id)
    assert done["status"] == "cancelled" and "cancelled_at" in done
    counts = done["request_counts"]
    assert 2 <= counts["completed"] < 300 and counts["failed"] == 0
    out = lines_of(srv, done["output_file_id"])
    ids = [x["custom_id"] for x in out]
    assert len(ids) == len(set(ids)) == counts["completed"]
    with pytest.raises(openai.BadRequestError):
        api(srv).batches.cancel(batch_id)  # already ended


def test_embeddings_batch(srv: LiveServer) -> None:
    wait_until(lambda: raw(srv).get(f"/v1/models/{EMBEDDER}").json().get("status") == "ready", 120)
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": EMBEDDER, "input": [f"sentence {i}", "another"]}}
        for i in range(3)
    ]  # fmt: skip
    done = wait_done(srv, create(srv, lines, "/v1/embeddings")["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    for x in lines_of(srv, done["output_file_id"]):
        assert_valid(x["response"]["body"], "CreateEmbeddingResponse")
        assert len(x["response"]["body"]["data"]) == 2


def batch_usage(srv: LiveServer) -> tuple[int, int, int]:
    """The usage API's batch totals for A's project: (input, output, requests)."""
    params = {"start_time": int(time.time()) - 3600, "batch": "true", "group_by": "project_id"}
    page = raw(srv, ADMIN).get("/v1/organization/usage/completions", params=params).json()
    mine = [r for b in page["data"] for r in b["results"]
            if r["project_id"] == env_principal(A, "member").project]  # fmt: skip
    return tuple(sum(r[k] for r in mine) for k in ("input_tokens", "output_tokens",
                                                   "num_model_requests"))  # fmt: skip


def test_responses_batch(srv: LiveServer) -> None:
    before = batch_usage(srv)
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": f"Say {i}.", "max_output_tokens": 4}}
        for i in range(2)
    ]  # fmt: skip
    done = wait_done(srv, create(srv, lines, "/v1/responses")["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 2
    spent = [0, 0, 0]
    for x in lines_of(srv, done["output_file_id"]):
        assert_valid(x["response"]["body"], "Response")
        use = x["response"]["body"]["usage"]
        spent = [spent[0] + use["input_tokens"], spent[1] + use["output_tokens"], spent[2] + 1]
    # The usage API counts each line as a batch request of its project, with its own usage.
    after = batch_usage(srv)
    assert [a - b for a, b in zip(after, before, strict=True)] == spent


def test_another_projects_batch_is_not_found(srv: LiveServer) -> None:
    batch_id = create(srv, [chat_line(1)])["id"]
    other = api(srv, B)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch_id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch_id)
    assert batch_id not in [b.id for b in other.batches.list()]
    wait_done(srv, batch_id)


def test_seeded_batch_output_equals_online(srv: LiveServer) -> None:
    bodies = [
        {"temperature": 1.0, "top_p": 0.95, "seed": 1234 + i, "max_tokens": 12} for i in range(3)
    ]
    done = wait_done(srv, create(srv, [chat_line(i, **b) for i, b in enumerate(bodies)])["id"])
    assert done["status"] == "completed"
    out = {x["custom_id"]: x["response"]["body"] for x in lines_of(srv, done["output_file_id"])}
    client = api(srv)
    for i, b in enumerate(bodies):
        online = client.chat.completions.create(**chat_line(i, **b)["body"])
        batched = out[f"req-{i}"]
        assert batched["choices"][0]["message"]["content"] == online.choices[0].message.content
        assert batched["system_fingerprint"] == online.system_fingerprint


LINES = 200


def test_sigkilled_server_finishes_the_batch_after_restart(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs, data = tmp_path_factory.mktemp("kill-logs"), tmp_path_factory.mktemp("kill-data")
    live = serve(tiny_model_dir, logs, data)
    try:
        # Enough work that the kill comes mid-batch: 40 lines of 8 tokens all finished before
        # it on a quiet 2-core EPYC, and nothing was left to resume.
        lines = [chat_line(i, max_tokens=24, ignore_eos=True) for i in range(LINES)]
        created = create(live, lines)
        batch_id = created["id"]
        wait_until(lambda: card(live, batch_id)["request_counts"]["completed"] >= 3, 120, 0.02)
        # The upload may go while the batch runs: it resumes from its own link to the bytes
        # (it failed on the restart, losing what had finished).
        assert api(live).files.delete(created["input_file_id"]).deleted
    finally:
        os.kill(live.proc.pid, signal.SIGKILL)  # mid-batch: no drain, no shutdown hook
        live.proc.wait()
    live = serve(tiny_model_dir, logs, data)
    try:
        # What was recorded before the kill is still there; the rest runs now.
        before = card(live, batch_id)
        assert before["status"] == "in_progress" and before["request_counts"]["completed"] >= 3
        # The runner resumes batches once every model is served, which can come just after
        # /health first answers: wait for its line rather than read the log at once.
        resumed = f"resuming batch {batch_id} (in_progress)"
        wait_until(lambda: resumed in live.log(), 60)
        assert resumed in live.log()
        done = wait_done(live, batch_id)
        ids = [x["custom_id"] for x in lines_of(live, done["output_file_id"])]
    finally:
        live.stop()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
    assert sorted(ids) == sorted(f"req-{i}" for i in range(LINES))  # each exactly once
    assert not (data / "batch-inputs" / f"{batch_id}.jsonl").exists()  # released at the end


def test_cli_creates_follows_lists_and_shows(srv: LiveServer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genserve.cli import app

    def cli(*args: str):  # noqa: ANN202
        env = {"OPENAI_API_KEY": A, "OPENAI_BASE_URL": srv.url}
        return CliRunner().invoke(app, ["batch", *args], env=env)

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(jsonl([chat_line(i) for i in range(3)]))
    run = cli("create", str(source), "--endpoint", CHAT, "--output", str(out))
    assert run.exit_code == 0, run.output
    assert "completed: 3 completed, 0 failed of 3" in run.output
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [
        "req-0", "req-1", "req-2"
    ]  # fmt: skip
    batch_id = api(srv).batches.list(limit=1).data[0].id
    assert batch_id in cli("list").output
    assert json.loads(cli("show", batch_id).output)["status"] == "completed"
    assert cli("cancel", batch_id).exit_code == 1  # it has ended: the error is shown


def test_output_expires_after_reaches_the_output_and_error_files(srv: LiveServer) -> None:
    client = api(srv)
    lines = [chat_line(i) for i in range(3)]
    lines[1]["body"]["temperature"] = 5  # one error line: an error file too
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    policy = {"anchor": "created_at", "seconds": 7200}
    batch = client.batches.create(
        input_file_id=f.id, endpoint=CHAT, completion_window="24h", output_expires_after=policy
    )
    done = wait_done(srv, batch.id)
    assert done["status"] == "completed", done
    for file_id in (done["output_file_id"], done["error_file_id"]):
        out = client.files.retrieve(file_id)
        assert out.expires_at == out.created_at + 7200
    assert client.files.retrieve(f.id).expires_at is None  # the input keeps its own policy
    for bad in ({"anchor": "created_at", "seconds": 10}, {"anchor": "x", "seconds": 7200}, {}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.create(
                input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                output_expires_after=bad,
            )  # fmt: skip
        assert caught.value.body["param"] == "output_expires_after"
