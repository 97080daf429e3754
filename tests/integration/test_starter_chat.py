"""The bundled `genserve-starter-chat` adapter: small, safetensors only, served by default
beside `genserve-starter`, and it changes what the model answers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from genserve.bundled import BUNDLED_DIR, bundled_adapters
from tests.conformance import assert_valid
from tests.server import LiveServer, start_server

ADAPTER = BUNDLED_DIR / "genserve-starter-chat"
PROMPT = "Write a Python function `is_even(n)` that: Return True if n is even."


@pytest.fixture(scope="module")
def starter_server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = start_server("genserve-starter", tmp_path_factory.mktemp("logs-starter-chat"))
    yield srv
    srv.stop()


def test_adapter_folder_is_small_and_safetensors_only() -> None:
    files = {p.name: p.stat().st_size for p in ADAPTER.iterdir()}
    assert set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "training_run.json",
    }
    assert sum(files.values()) < 8 * 2**20
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert config["genserve_base"] == "genserve-starter"
    assert config["peft_type"] == "LORA"
    assert bundled_adapters("genserve-starter") == [("genserve-starter-chat", ADAPTER)]


def test_listed_beside_the_starter(starter_server: LiveServer) -> None:
    body = httpx.get(starter_server.url + "/v1/models").json()
    assert_valid(body, "ListModelsResponse")
    parents = {m["id"]: m.get("parent") for m in body["data"]}
    assert parents["genserve-starter-chat"] == "genserve-starter"


def _greedy(server: LiveServer, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "seed": 0,
        "max_tokens": 40,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["message"]["content"]


def test_adapter_answers_differently_from_the_base(starter_server: LiveServer) -> None:
    chat = _greedy(starter_server, "genserve-starter-chat")
    base = _greedy(starter_server, "genserve-starter")
    assert chat != base
    assert chat == _greedy(starter_server, "genserve-starter-chat")  # seeded greedy: repeatable


def readme_block(after_heading: str) -> str:
    """The first ```python block of the README after a heading, as a user would copy it."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text[text.index(after_heading) :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_the_readme_tool_call_example_runs_as_written(starter_server: LiveServer) -> None:
    """Run against the default model, as a user pasting it would (it once ended in a 400: the
    model called tools until max_tokens, and the follow-up overflowed the context)."""
    import openai

    client = openai.OpenAI(base_url=starter_server.url + "/v1", api_key="x", max_retries=0)
    printed: list[tuple] = []
    scope = {"client": client, "print": lambda *a, **_: printed.append(a)}
    exec(readme_block("### Tool calls"), scope)  # noqa: S102 - the README's own example
    name, arguments = printed[0]
    assert name == "get_weather" and set(arguments) == {"city", "unit"}
    assert scope["r"].choices[0].finish_reason == "tool_calls"
    assert len(printed) == 2  # the follow-up answered
