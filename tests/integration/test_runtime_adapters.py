"""LoRA adapters loaded while the server runs: POST /v1/models with an adapter folder of the
models directory, and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter. Served at once
beside their base, kept across a restart, gone after DELETE; bad folders and paths are 4xx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.test_adapters import save_random_adapter
from tests.server import LiveServer, start_server


@pytest.fixture(scope="module")
def models_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_random_adapter(tiny_model_dir, root / "a0", seed=0)
    save_random_adapter(tiny_model_dir, root / "a1", seed=1)
    pickled = shutil.copytree(root / "a0", root / "pickled")  # pickle only: refused
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    prefix = shutil.copytree(root / "a0", root / "prefix")  # not a LoRA
    cfg = json.loads((prefix / "adapter_config.json").read_text())
    (prefix / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    (root / "empty").mkdir()
    return root


def serve(model: Path, models_root: Path, data: Path, logs: Path) -> LiveServer:
    args = ["--models-dir", str(models_root), "--data-dir", str(data), "--deterministic"]
    return start_server(model, logs, *args)


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    data, logs = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("logs")
    srv = serve(tiny_model_dir, models_root, data, logs)
    srv.data, srv.logs = data, logs  # type: ignore[attr-defined] - for the restart
    yield srv
    srv.stop()


def greedy(url: str, model: str) -> str:
    body = {"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_post_models_serves_an_adapter_folder_across_a_restart(
    server: LiveServer, tiny_model_dir: Path, models_root: Path
) -> None:
    r = httpx.post(server.url + "/v1/models", json={"model": "a0", "id": "mine"}, timeout=60)
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["status"] == "ready" and card["parent"] == "tiny-llama" and card["kind"] == "lora"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert {m.id for m in client.models.list()} >= {"tiny-llama", "mine"}
    adapted, base = greedy(server.url, "mine"), greedy(server.url, "tiny-llama")
    assert adapted != base  # the adapter's random lora_B changes the output
    # A restart serves it again from its record, with the same output.
    server.stop()
    again = serve(tiny_model_dir, models_root, server.data, server.logs)  # type: ignore[attr-defined]
    server.proc, server.port = again.proc, again.port
    assert greedy(server.url, "mine") == adapted
    assert client.with_options(base_url=server.url + "/v1").models.delete("mine").deleted
    with pytest.raises(openai.NotFoundError):
        client.with_options(base_url=server.url + "/v1").models.retrieve("mine")


def test_vllm_routes_load_replace_and_unload(server: LiveServer, models_root: Path) -> None:
    load = {"lora_name": "v", "lora_path": str(models_root / "a0")}  # absolute, as vLLM's users
    r = httpx.post(server.url + "/v1/load_lora_adapter", json=load, timeout=60)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'v' added successfully."
    first = greedy(server.url, "v")
    twice = httpx.post(server.url + "/v1/load_lora_adapter", json=load, timeout=60)
    assert twice.status_code == 409 and twice.json()["error"]["param"] == "id", twice.text
    bad = {"lora_name": "v", "lora_path": "empty", "load_inplace": True}
    assert httpx.post(server.url + "/v1/load_lora_adapter", json=bad).status_code == 400
    assert greedy(server.url, "v") == first  # a bad replacement leaves it served
    swap = {"lora_name": "v", "lora_path": "a1", "load_inplace": True}
    assert httpx.post(server.url + "/v1/load_lora_adapter", json=swap, timeout=60).is_success
    assert greedy(server.url, "v") != first  # a1's weights now
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "v"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'v' removed successfully."
    gone = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "v"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    base = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "tiny-llama"})
    assert base.status_code == 404  # a base model is not an adapter: DELETE unloads it


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"model": "../outside"}, 403, "model", "outside the models directory"),
        ({"model": "/etc", "kind": "lora"}, 403, "model", "outside the models directory"),
        ({"model": "empty", "kind": "lora"}, 400, "model", "adapter_config.json"),
        ({"model": "nothing-here", "kind": "lora"}, 400, "model", "no adapter folder"),
        ({"model": "a\u0000b", "kind": "lora"}, 400, "model", "not a usable path"),
        ({"model": "a\u0000b"}, 400, "model", "not a usable path"),
        ({"model": "pickled"}, 400, "model", "pickle"),
        ({"model": "prefix"}, 400, "model", "only LoRA"),
        ({"model": "a0", "base": "no-such"}, 400, "base", "no-such"),
        ({"model": "a0", "id": "tiny-llama"}, 409, "id", "already"),
        ({"model": "a0", "settings": {"aliases": ["x"]}}, 400, "settings", "base model"),
        ({"model": "a0", "kind": "generate", "base": "tiny-llama"}, 400, "base", "LoRA"),
    ],
)
def test_bad_adapters_are_4xx_naming_the_field(
    server: LiveServer, body: dict, status: int, param: str, says: str
) -> None:
    r = httpx.post(server.url + "/v1/models", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    listed = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert listed == {"tiny-llama"}  # nothing half-registered


def test_a_bad_vllm_load_is_a_4xx(server: LiveServer) -> None:
    outside = {"lora_name": "x", "lora_path": "/tmp"}
    r = httpx.post(server.url + "/v1/load_lora_adapter", json=outside)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_path", r.text
    unknown = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "lora_path"
    bad = [
        ({"lora_name": "x" * 10_000, "lora_path": "a0"}, "lora_name"),  # huge
        ({"lora_name": 7, "lora_path": "a0"}, "lora_name"),  # not a string
        ({"lora_name": "x", "lora_path": "a0", "load_inplace": "yes"}, "load_inplace"),
    ]
    for body, param in bad:
        r = httpx.post(server.url + "/v1/load_lora_adapter", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    raw = httpx.post(
        server.url + "/v1/load_lora_adapter", content=b"{not json",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    # Nothing of it registered, and the base still answers.
    assert {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]} == {"tiny-llama"}
    assert greedy(server.url, "tiny-llama")
