"""A fine-tuned model whose base was loaded through POST /v1/models: served when the job ends,
when its base comes back after an unload (even if the job ended while it was away), and after
a restart, where the registry loads the base only after the fine-tuned models are restored."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.server import LiveServer, start_server, wait_until
from tests.tiny_model import build_tiny_model

BASE = "second"


def training_file(http: httpx.Client) -> str:
    lines = []
    for i in range(12):
        messages = [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{2 * i}"},
        ]
        lines.append(json.dumps({"messages": messages}))
    data = ("\n".join(lines) + "\n").encode()
    r = http.post("/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def served_ids(http: httpx.Client) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def load_base(http: httpx.Client) -> None:
    assert http.post("/v1/models", json={"model": BASE}).status_code == 202
    wait_until(lambda: http.get(f"/v1/models/{BASE}").json().get("status") == "ready")


def answers(http: httpx.Client, model: str) -> bool:
    r = http.post("/v1/completions", json={"model": model, "prompt": "1 + 1", "max_tokens": 2})
    return r.status_code == 200 and r.json()["model"] == model


@pytest.fixture()
def setup(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    models = tmp_path / "models"
    build_tiny_model(models / BASE, num_hidden_layers=1)
    args = ("--models-dir", str(models), "--data-dir", str(tmp_path / "data"))
    return tmp_path, args


def test_fine_tuned_model_follows_its_registry_loaded_base(
    tiny_model_dir: Path, setup: tuple[Path, tuple[str, ...]]
) -> None:
    tmp, args = setup
    srv: LiveServer = start_server(tiny_model_dir, tmp, *args)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            load_base(http)
            hyper = {"n_epochs": 3, "batch_size": 2}
            body = {"model": BASE, "training_file": training_file(http), "hyperparameters": hyper}
            job = http.post("/v1/fine_tuning/jobs", json=body).json()
            url = f"/v1/fine_tuning/jobs/{job['id']}"
            pid = wait_until(lambda: http.get(url).json().get("x_genserve_worker_pid"), every=0.02)
            os.kill(pid, signal.SIGSTOP)  # the base is unloaded while the job is surely training
            try:
                assert http.delete(f"/v1/models/{BASE}").status_code == 200
            finally:
                os.kill(pid, signal.SIGCONT)
            done = wait_until(lambda: (j := http.get(url).json())["status"] != "running" and j)
            assert done["status"] == "succeeded", done["error"]
            ft = done["fine_tuned_model"]
            assert ft not in served_ids(http) and http.get(f"/v1/models/{ft}").status_code == 404
            events = [e["message"] for e in http.get(url + "/events").json()["data"]]
            assert f"The base model {BASE} is not loaded; {ft} is served once it is" in events

            load_base(http)  # the job ended while it was away: served now
            assert wait_until(lambda: answers(http, ft))
            assert http.delete(f"/v1/models/{BASE}").status_code == 200  # unloaded with it
            assert http.get(f"/v1/models/{ft}").status_code == 404
            load_base(http)  # and back with it
            assert wait_until(lambda: answers(http, ft))
            taken = http.post("/v1/models", json={"model": BASE, "id": ft})  # an adapter's id
            assert taken.status_code == 409 and taken.json()["error"]["param"] == "id"
        srv.stop()

        srv = start_server(tiny_model_dir, tmp, *args)  # restored before its base loads
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert wait_until(lambda: answers(http, ft))
            assert f"{ft} is served once its base {BASE} is loaded" in srv.log()
    finally:
        srv.stop()
