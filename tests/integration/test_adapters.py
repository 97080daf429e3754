"""LoRA adapters served beside the base model: listed, batched per row, deleted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server


def save_random_adapter(base_dir: Path, folder: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    root = tmp_path_factory.mktemp("adapters")
    args = []
    for i in range(3):
        path = save_random_adapter(tiny_model_dir, root / f"a{i}", seed=i)
        args += ["--lora-modules", f"ft:tiny-llama:a{i}:test={path}"]
    # --deterministic: the test compares each adapter's output alone and in mixed batches
    srv = start_server(
        tiny_model_dir, tmp_path_factory.mktemp("logs-lora"), *args, "--deterministic"
    )
    yield srv
    srv.stop()


def test_adapters_listed_with_parent(lora_server: LiveServer) -> None:
    body = httpx.get(lora_server.url + "/v1/models").json()
    assert_valid(body, "ListModelsResponse")
    parents = {m["id"]: m.get("parent") for m in body["data"]}
    assert parents["ft:tiny-llama:a0:test"] == "tiny-llama"
    assert len(parents) == 4


async def test_mixed_adapters_batched_give_their_own_outputs(lora_server: LiveServer) -> None:
    models = [
        "tiny-llama",
        "ft:tiny-llama:a0:test",
        "ft:tiny-llama:a1:test",
        "ft:tiny-llama:a2:test",
    ]

    async def one(http: httpx.AsyncClient, model: str) -> str:
        body = {"model": model, "prompt": "Hello", "max_tokens": 12, "temperature": 0}
        r = await http.post("/v1/completions", json={**body, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async with httpx.AsyncClient(base_url=lora_server.url, timeout=120) as http:
        alone = [await one(http, m) for m in models]
        together = await asyncio.gather(*[one(http, m) for m in models * 3])
    assert len(set(alone)) == 4  # each adapter changes the output
    assert together == alone * 3  # and batching them together changes nothing


def test_delete_fine_tuned_model(lora_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="x", max_retries=0)
    deleted = client.models.delete("ft:tiny-llama:a2:test")
    assert deleted.deleted and deleted.id == "ft:tiny-llama:a2:test"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ft:tiny-llama:a2:test", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.models.delete("ft:tiny-llama:a2:test")
    assert "ft:tiny-llama:a2:test" not in [m.id for m in client.models.list()]


def test_unloading_the_base_takes_its_adapters(lora_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="x", max_retries=0)
    assert client.models.delete("tiny-llama").deleted
    assert [m.id for m in client.models.list()] == []
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ft:tiny-llama:a0:test", prompt="x", max_tokens=1)


def test_bad_adapter_fails_the_start_loudly(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    with pytest.raises(RuntimeError, match="adapter"):
        # The default timeout: the failure ends the start at once, and a loaded 2-core machine
        # took over 30 s to get to the adapters (the start timed out instead of failing).
        start_server(tiny_model_dir, tmp_path, "--lora-modules", f"x={tmp_path / 'broken'}")
