"""Tenants, roles and quotas on a live server with two member keys (each its own project) and
an admin key: B never reaches A's files, jobs or fine-tuned model (404, as for an id that does
not exist, and never in a list); only the admin manages base models (403 for members); names
cannot be taken over by registering a model; a project's quotas answer 429 with Retry-After."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server, wait_until
from tests.tiny_model import build_tiny_model

MODEL = "tiny-llama"
A, B, Q, ADMIN = "sk-a", "sk-b", "sk-q", "sk-admin"  # Q's project is the quota tests' alone
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_FILES, MAX_BYTES = 3, 64 * 1024


def training_data(n: int) -> bytes:
    lines = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{2 * i}"},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    models = tmp_path_factory.mktemp("tenant-models")
    build_tiny_model(models / "second", num_hidden_layers=1)
    env = {"GENSERVE_API_KEYS": f"{A},{B},{Q}", "GENSERVE_ADMIN_KEYS": ADMIN}
    args = (
        "--max-model-len", "128", "--models-dir", str(models),
        "--max-files-per-project", str(MAX_FILES),
        "--max-file-bytes-per-project", str(MAX_BYTES), "--max-jobs-per-project", "1",
    )  # fmt: skip
    live = start_server(tiny_model_dir, tmp_path_factory.mktemp("tenant-logs"), *args, env=env)
    yield live
    live.stop()


def http(srv: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def api(srv: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def a_job(srv: LiveServer) -> dict:
    """A's fine-tuning job run to the end, kept short: 8 examples, 1 epoch of 2 steps."""
    client = api(srv, A)
    file_id = client.files.create(file=("a.jsonl", training_data(8)), purpose="fine-tune").id
    hyper = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, suffix="a", seed=1, hyperparameters=hyper
    )
    with http(srv, A) as h:
        done = wait_until(
            lambda: (
                (j := h.get(f"/v1/fine_tuning/jobs/{job.id}").json())["status"] in TERMINAL and j
            ),
            timeout=180,
        )
    assert done["status"] == "succeeded", done["error"]
    return done


def not_found_like_a_missing_id(r: httpx.Response, real_id: str, missing: httpx.Response) -> None:
    """The answer for another project's object is the one for an id that does not exist."""
    assert r.status_code == 404 == missing.status_code, r.text
    assert_valid(r.json(), "ErrorResponse")
    got, want = r.json()["error"], missing.json()["error"]
    assert real_id in got["message"]
    assert {k: got[k] for k in ("type", "param", "code")} == {
        k: want[k] for k in ("type", "param", "code")
    }


def test_b_cannot_reach_a_files(srv: LiveServer, a_job: dict) -> None:
    file_id, results_id = a_job["training_file"], a_job["result_files"][0]
    with http(srv, B) as b:
        for fid in (file_id, results_id):
            for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
                r = b.request(method, f"/v1/files/{fid}{path}")
                missing = b.request(method, f"/v1/files/file-000000000000000000000000{path}")
                not_found_like_a_missing_id(r, fid, missing)
        assert b.get("/v1/files").json()["data"] == []
        assert b.get("/v1/files", params={"after": file_id}).json()["data"] == []
        with pytest.raises(openai.NotFoundError):
            api(srv, B).files.content(file_id)
    with http(srv, A) as a:  # still A's, whole
        listed = [f["id"] for f in a.get("/v1/files").json()["data"]]
        assert file_id in listed and results_id in listed
        assert a.get(f"/v1/files/{file_id}/content").content == training_data(8)


def test_b_cannot_reach_a_job(srv: LiveServer, a_job: dict) -> None:
    job_id = a_job["id"]
    with http(srv, B) as b:
        for method, path in (
            ("GET", ""), ("GET", "/events"), ("GET", "/checkpoints"), ("POST", "/cancel"),
            ("POST", "/pause"), ("POST", "/resume"),
        ):  # fmt: skip
            r = b.request(method, f"/v1/fine_tuning/jobs/{job_id}{path}")
            missing = b.request(method, f"/v1/fine_tuning/jobs/ftjob-nope{path}")
            not_found_like_a_missing_id(r, job_id, missing)
        assert b.get("/v1/fine_tuning/jobs").json()["data"] == []
        # Training on A's file: that file does not exist for B.
        r = b.post(
            "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": a_job["training_file"]}
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
        assert b.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created
    with pytest.raises(openai.NotFoundError):
        api(srv, B).fine_tuning.jobs.retrieve(job_id)
    a = api(srv, A)
    assert [j.id for j in a.fine_tuning.jobs.list()] == [job_id]
    assert a.fine_tuning.jobs.retrieve(job_id).status == "succeeded"  # B's cancel did nothing
    assert len(a.fine_tuning.jobs.list_events(job_id).data) > 0


def test_b_cannot_use_see_or_delete_a_model(srv: LiveServer, a_job: dict) -> None:
    ft = a_job["fine_tuned_model"]
    messages = [{"role": "user", "content": "What is 1 + 1?"}]
    reply = api(srv, A).chat.completions.create(model=ft, messages=messages, max_tokens=4)
    assert reply.model == ft
    b = api(srv, B)
    with pytest.raises(openai.NotFoundError) as e:
        b.chat.completions.create(model=ft, messages=messages, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        b.completions.create(model=ft, prompt="1 +", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        b.models.retrieve(ft)
    assert ft not in [m.id for m in b.models.list()]
    assert MODEL in [m.id for m in b.models.list()]  # base models are shared
    with http(srv, B) as h:
        assert h.post("/tokenize", json={"model": ft, "prompt": "x"}).status_code == 404
        assert h.post("/v1/embeddings", json={"model": ft, "input": "x"}).status_code == 404
        assert (
            h.post("/v1/fine_tuning/jobs", json={"model": ft, "training_file": "f"}).status_code
            == 404
        )
        r = h.delete(f"/v1/models/{ft}")
        missing = h.delete("/v1/models/ft:tiny-llama:a:ftjob-nope")
        assert r.status_code == 404 == missing.status_code
        assert r.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    assert ft in [m.id for m in api(srv, A).models.list()]
    # A member may delete its own project's fine-tuned model, as OpenAI lets owners do.
    with http(srv, A) as h:
        assert h.delete(f"/v1/models/{ft}").json()["deleted"] is True
    assert ft not in [m.id for m in api(srv, A).models.list()]


def test_members_get_403_on_base_models_and_the_admin_manages_them(srv: LiveServer) -> None:
    attempts = (
        ("POST", "/v1/models", {"model": "second", "id": "by-member"}),
        ("PATCH", f"/v1/models/{MODEL}", {"defaults": {"max_tokens": 1}}),
        ("PUT", f"/v1/models/{MODEL}", {"chat_template": "{{ 'hijacked' }}"}),
        ("DELETE", f"/v1/models/{MODEL}", None),
        # vLLM's adapter routes: an adapter is served to every project, as a base model is
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "second"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
    )
    with http(srv, A) as member:
        for method, path, body in attempts:
            r = member.request(method, path, json=body)
            assert r.status_code == 403, (method, r.text)
            assert_valid(r.json(), "ErrorResponse")
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["code"] == "insufficient_permissions" and "admin" in error["message"]
        card = member.get(f"/v1/models/{MODEL}").json()
        assert card["settings"]["defaults"] == {} and card["settings"]["chat_template"] is None
    with pytest.raises(openai.PermissionDeniedError):
        api(srv, B).models.delete(MODEL)
    with http(srv, ADMIN) as admin:
        r = admin.patch(f"/v1/models/{MODEL}", json={"max_context": 64})
        assert r.status_code == 200 and r.json()["max_context"] == 64
        assert r.json()["max_model_len"] == 64  # vLLM's name, which its clients read
        r = admin.put(f"/v1/models/{MODEL}", json={})
        assert r.status_code == 200 and r.json()["max_context"] == 128
        assert admin.post("/v1/models", json={"model": "second"}).status_code == 202
        card = wait_until(
            lambda: (c := admin.get("/v1/models/second").json())["status"] != "loading" and c
        )
        assert card["status"] == "ready", card
        assert admin.delete("/v1/models/second").json()["deleted"] is True


def test_registering_cannot_take_over_names(srv: LiveServer) -> None:
    with http(srv, ADMIN) as admin:
        assert admin.patch(f"/v1/models/{MODEL}", json={"aliases": ["main"]}).status_code == 200
        try:
            for settings, model_id in (
                ({"aliases": [MODEL]}, "b-model"),  # another model's id
                ({"aliases": ["main"]}, "b-model"),  # another model's alias
                ({"aliases": ["b-model"]}, "b-model"),  # its own id
                ({}, "main"),  # an id that is another model's alias
            ):
                body = {"model": "second", "id": model_id, "settings": settings}
                r = admin.post("/v1/models", json=body)
                assert r.status_code == 409, (body, r.text)
                assert_valid(r.json(), "ErrorResponse")
            assert "b-model" not in [m["id"] for m in admin.get("/v1/models").json()["data"]]
            reply = admin.post(
                "/v1/completions", json={"model": "main", "prompt": "a", "max_tokens": 1}
            )
            assert reply.status_code == 200 and reply.json()["model"] == MODEL  # "main" is it
        finally:
            admin.patch(f"/v1/models/{MODEL}", json={"aliases": []})


def assert_quota_429(r: httpx.Response, words: str) -> None:
    assert r.status_code == 429, r.text
    assert_valid(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert error["code"] == "quota_exceeded" and error["type"] == "rate_limit_error"
    assert words in error["message"]
    assert int(r.headers["retry-after"]) > 0
    assert r.headers["x-should-retry"] == "false"  # waiting alone frees no quota


def test_file_quotas_answer_429_with_retry_after(srv: LiveServer) -> None:
    def upload(h: httpx.Client, size: int) -> httpx.Response:
        return h.post(
            "/v1/files", files={"file": ("b.bin", b"x" * size)}, data={"purpose": "batch"}
        )

    with http(srv, Q) as q:
        big = upload(q, 40 * 1024)
        assert big.status_code == 200
        assert_quota_429(upload(q, 40 * 1024), "bytes")
        assert upload(q, 10).status_code == 200
        assert upload(q, 10).status_code == 200
        assert_quota_429(upload(q, 10), f"{MAX_FILES} files")
        with pytest.raises(openai.RateLimitError):
            api(srv, Q).files.create(file=("c.bin", b"x"), purpose="batch")
        # Other projects have quotas of their own, and deleting frees this one's.
        assert upload(http(srv, B), 40 * 1024).status_code == 200
        assert q.delete(f"/v1/files/{big.json()['id']}").status_code == 200
        assert upload(q, 10).status_code == 200
        for f in q.get("/v1/files").json()["data"]:
            q.delete(f"/v1/files/{f['id']}")


def test_job_quota_answers_429_with_retry_after(srv: LiveServer) -> None:
    with http(srv, Q) as q:
        up = q.post(
            "/v1/files",
            files={"file": ("t.jsonl", training_data(4))},
            data={"purpose": "fine-tune"},
        )
        body = {
            "model": MODEL,
            "training_file": up.json()["id"],
            "hyperparameters": {"n_epochs": 1},
        }
        first = q.post("/v1/fine_tuning/jobs", json=body)
        assert first.status_code == 200
        try:
            assert_quota_429(q.post("/v1/fine_tuning/jobs", json=body), "fine-tuning jobs")
        finally:
            q.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel")
        assert q.get(f"/v1/fine_tuning/jobs/{first.json()['id']}").json()["status"] == "cancelled"


def test_health_is_not_ok_once_the_last_model_is_unloaded(srv: LiveServer) -> None:
    """Last: it takes the module's server down to no model."""
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    with http(srv, ADMIN) as admin:
        assert admin.delete(f"/v1/models/{MODEL}").status_code == 200
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "no_model"
