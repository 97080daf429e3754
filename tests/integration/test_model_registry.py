"""Models as REST resources: POST loads, PUT/PATCH reconfigure, DELETE unloads; it persists."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.server import start_server
from tests.tiny_model import build_tiny_model


def wait_status(url: str, model_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        card = httpx.get(f"{url}/v1/models/{model_id}").json()
        if card.get("status") != "loading":
            return card
        time.sleep(0.1)
    raise TimeoutError(model_id)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models-dir")
    build_tiny_model(root / "second", num_hidden_layers=1)
    pickled = build_tiny_model(root / "pickled")
    state = {k: v.contiguous() for k, v in _load_state(pickled).items()}
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return root


def _load_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def reg_server(tiny_model_dir: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("reg-data")
    args = ("--models-dir", str(models_dir), "--data-dir", str(data))
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("reg-logs"), *args)
    yield srv, args
    srv.stop()


async def test_second_model_loads_while_first_streams(reg_server) -> None:
    srv, _ = reg_server
    body = {"model": "tiny-llama", "prompt": "a", "max_tokens": 300, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:

        async def stream() -> tuple[int, str | None]:
            tokens, reason = 0, None
            opts = {"stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/v1/completions", json={**body, **opts}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        reason = chunk["choices"][0]["finish_reason"] or reason
                    else:
                        tokens = chunk["usage"]["completion_tokens"]
            return tokens, reason

        task = asyncio.create_task(stream())
        await asyncio.sleep(0.2)
        r = await http.post("/v1/models", json={"model": "second"})
        assert r.status_code == 202 and r.json()["status"] == "loading"
        health = (await http.get("/health")).json()  # the server serves; a model still loads
        assert health["status"] == "ok" and "second" in health["loading"]
        tokens, reason = await task
    assert (tokens, reason) == (300, "length")  # the stream ran to its end, unbroken
    card = await asyncio.to_thread(wait_status, srv.url, "second")
    assert card["status"] == "ready"
    assert "second" not in httpx.get(srv.url + "/health").json()["loading"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": "second", "prompt": "x"})
    assert r.status_code == 200


def test_a_model_unloads_the_moment_its_card_says_ready(reg_server) -> None:
    """No moment where the card says ready but DELETE still finds it loading (409)."""
    srv, _ = reg_server
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for round_ in range(3):
            r = http.post("/v1/models", json={"model": "second", "id": f"quick-{round_}"})
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 60
            while (card := http.get(f"/v1/models/quick-{round_}").json())["status"] == "loading":
                assert time.monotonic() < deadline  # polled without a pause, to hit the switch
            assert card["status"] == "ready", card
            r = http.delete(f"/v1/models/quick-{round_}")
            assert r.status_code == 200 and r.json()["deleted"] is True, r.text
            assert http.get(f"/v1/models/quick-{round_}").status_code == 404


def model_series(url: str, model_id: str) -> list[str]:
    text = httpx.get(url + "/metrics").text
    return [line for line in text.splitlines() if f'model_name="{model_id}"' in line]


def test_unloading_a_model_removes_its_metrics(reg_server) -> None:
    """Every series of an unloaded model leaves /metrics, histograms and counters too; one
    loaded again under its id counts afresh."""
    srv, _ = reg_server
    for round_ in range(2):
        r = httpx.post(srv.url + "/v1/models", json={"model": "second", "id": "metered"})
        assert r.status_code == 202, r.text
        assert wait_status(srv.url, "metered")["status"] == "ready"
        body = {"model": "metered", "prompt": "x", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 200
        series = model_series(srv.url, "metered")
        assert any(s.startswith("genserve:e2e_request_latency_seconds_count") for s in series)
        assert any(s.startswith("genserve:generation_tokens_total") for s in series)
        count = 'genserve:e2e_request_latency_seconds_count{model_name="metered"} 1.0'
        assert count in series, (round_, series)  # the first load's request is not counted
        assert httpx.delete(srv.url + "/v1/models/metered").status_code == 200
        assert model_series(srv.url, "metered") == []
        assert model_series(srv.url, "tiny-llama")  # the other model's stay


@pytest.mark.parametrize("ref", ["../outside", "/etc", "second/../../x", str(Path.home())])
def test_paths_outside_the_models_dir_are_refused(reg_server, ref: str) -> None:
    srv, _ = reg_server
    r = httpx.post(srv.url + "/v1/models", json={"model": ref, "id": "evil"})
    assert r.status_code in (400, 403) and r.json()["error"]["param"] == "model"


def test_pickle_only_checkpoint_fails_with_reason(reg_server) -> None:
    srv, _ = reg_server
    assert httpx.post(srv.url + "/v1/models", json={"model": "pickled"}).status_code == 202
    card = wait_status(srv.url, "pickled")
    assert card["status"] == "failed" and "pickle" in card["error"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": "pickled", "prompt": "x"})
    assert r.status_code == 503
    assert httpx.delete(srv.url + "/v1/models/pickled").status_code == 200


def test_put_patch_defaults_aliases_and_context(reg_server) -> None:
    srv, _ = reg_server
    settings = {"defaults": {"temperature": 0, "max_tokens": 3}, "aliases": ["main"]}
    r = httpx.put(srv.url + "/v1/models/tiny-llama", json=settings)
    assert r.status_code == 200 and r.json()["settings"]["aliases"] == ["main"]
    a = httpx.post(srv.url + "/v1/completions", json={"model": "main", "prompt": "x"}).json()
    b = httpx.post(srv.url + "/v1/completions", json={"model": "tiny-llama", "prompt": "x"}).json()
    assert a["usage"]["completion_tokens"] <= 3 and a["choices"] == b["choices"]  # greedy
    # DELETE names a model by its id: through an alias it is a 400 that says which model it
    # would have unloaded, and nothing is unloaded (it was a bare 404).
    by_alias = httpx.delete(srv.url + "/v1/models/main")
    assert by_alias.status_code == 400, by_alias.text
    err = by_alias.json()["error"]
    assert err["code"] == "model_is_alias" and "tiny-llama" in err["message"]
    assert httpx.get(srv.url + "/v1/models/tiny-llama").json()["status"] == "ready"
    r = httpx.patch(srv.url + "/v1/models/tiny-llama", json={"max_context": 32})
    assert r.json()["settings"]["defaults"] == {"temperature": 0, "max_tokens": 3}
    too_long = httpx.post(
        srv.url + "/v1/completions", json={"model": "main", "prompt": "x", "max_tokens": 40}
    )
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    bad = httpx.patch(srv.url + "/v1/models/tiny-llama", json={"defaults": {"temperature": 9}})
    assert bad.status_code == 400
    clash = httpx.patch(srv.url + "/v1/models/second", json={"aliases": ["main"]})
    assert clash.status_code in (404, 409)


def test_set_changes_the_defaults_it_names_and_keeps_the_rest(reg_server) -> None:
    """`genserve models set --default` and PATCH merge defaults key by key (a null removes
    one); PUT replaces them."""
    from typer.testing import CliRunner

    from genserve.cli import app

    srv, _ = reg_server
    url = srv.url + "/v1/models/tiny-llama"
    before = httpx.get(url).json()["settings"]
    try:
        r = httpx.put(url, json={**before, "defaults": {"temperature": 0.2, "max_tokens": 256}})
        assert r.status_code == 200, r.text
        args = ["models", "set", "tiny-llama", "--default", "max_tokens=16"]
        run = CliRunner().invoke(app, [*args, "--base-url", srv.url + "/v1"])
        assert run.exit_code == 0, run.output
        defaults = httpx.get(url).json()["settings"]["defaults"]
        assert defaults == {"temperature": 0.2, "max_tokens": 16}
        r = httpx.patch(url, json={"defaults": {"temperature": None, "seed": 7}})
        assert r.json()["settings"]["defaults"] == {"max_tokens": 16, "seed": 7}
        r = httpx.put(url, json={**before, "defaults": {"top_p": 0.5}})
        assert r.json()["settings"]["defaults"] == {"top_p": 0.5}
        r = httpx.patch(url, json={"defaults": None})
        assert r.json()["settings"]["defaults"] == {}
    finally:
        httpx.put(url, json=before)


def test_names_claimed_by_a_loading_model_are_taken(reg_server) -> None:
    """A loading model's id and aliases are names in use: a second load, or a PATCH, claiming
    one is a 409 (both loaded before, and the alias resolved to whichever came first)."""
    srv, _ = reg_server
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post(
            "/v1/models", json={"model": "second", "id": "q1", "settings": {"aliases": ["q2"]}}
        )
        assert r.status_code == 202, r.text
        clash = http.post("/v1/models", json={"model": "second", "id": "q2"})  # q1's alias
        assert clash.status_code == 409 and clash.json()["error"]["param"] == "id", clash.text
        for aliases in (["q2"], ["q1"]):  # loading or loaded: q1's names stay q1's
            r = http.patch("/v1/models/tiny-llama", json={"aliases": aliases})
            assert r.status_code == 409 and r.json()["error"]["param"] == "aliases", r.text
        twice = http.patch("/v1/models/tiny-llama", json={"aliases": ["z", "z"]})
        assert twice.status_code == 400 and twice.json()["error"]["param"] == "aliases"
        assert wait_status(srv.url, "q1")["status"] == "ready"
        r = http.post("/v1/completions", json={"model": "q2", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] in ("q1", "q2"), r.text
        # An alias reaches its model's settings as GET reaches its card (PATCH was a 404)
        r = http.patch("/v1/models/q2", json={"max_context": 64})
        assert r.status_code == 200 and r.json()["id"] == "q1", r.text
        assert http.get("/v1/models/q1").json()["max_context"] == 64
        assert http.delete("/v1/models/q1").status_code == 200
        # Released with the model: the names are free again.
        r = http.patch("/v1/models/tiny-llama", json={"aliases": ["main", "q2"]})
        assert r.status_code == 200, r.text
        assert http.patch("/v1/models/tiny-llama", json={"aliases": ["main"]}).status_code == 200


def test_registry_and_settings_survive_a_restart(
    reg_server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    srv, args = reg_server
    httpx.post(srv.url + "/v1/models", json={"model": "second"})  # 409 or 202: either way there
    wait_status(srv.url, "second")
    srv.stop()
    again = start_server(tiny_model_dir, tmp_path, *args)
    try:
        card = wait_status(again.url, "second")
        assert card["status"] == "ready"
        settings = httpx.get(again.url + "/v1/models/tiny-llama").json()["settings"]
        assert settings["aliases"] == ["main"] and settings["max_context"] == 32
        r = httpx.post(again.url + "/v1/completions", json={"model": "main", "prompt": "x"})
        assert r.json()["usage"]["completion_tokens"] <= 3
        assert httpx.delete(again.url + "/v1/models/second").status_code == 200
        assert httpx.get(again.url + "/v1/models/second").status_code == 404
    finally:
        again.stop()


def test_model_that_does_not_fit_is_507(tiny_model_dir: Path, models_dir: Path, tmp_path: Path):
    srv = start_server(
        tiny_model_dir, tmp_path, "--models-dir", str(models_dir), "--memory-budget-gb", "0.01"
    )
    try:
        r = httpx.post(srv.url + "/v1/models", json={"model": "second"})
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_memory"
    finally:
        srv.stop()
