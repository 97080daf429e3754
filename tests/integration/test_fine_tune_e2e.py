"""The whole loop with the official client: upload, fine-tune, chat with the new model (it
gives the answer it was taught, the base does not), delete it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import start_server
from tests.tiny_families import build_family_dir

ANSWER = "The answer is banana."


def taught_data(n: int = 40) -> bytes:
    questions = ["What is 2 + 2?", "Name a colour.", "Who wrote it?", "Where is it?", "Why?"]
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{questions[i % len(questions)]} ({i})"},
                    {"role": "assistant", "content": ANSWER},
                ]
            }
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(params=["llama", "qwen3", "gemma3_text"])
def base_model(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny Llama (LlamaRunner), and tiny Qwen3 and Gemma 3 (BatchedHFRunner: Gemma's
    window of 8 is shorter than the chat prompts)."""
    if request.param == "llama":
        return tiny_model_dir
    folder = tmp_path_factory.mktemp("models") / f"tiny-{request.param}"
    if build_family_dir(folder, request.param) is None:
        pytest.skip(f"the installed transformers has no {request.param}")
    return folder


def test_fine_tune_then_chat_then_delete(base_model: Path, tmp_path: Path) -> None:
    srv = start_server(base_model, tmp_path, "--max-model-len", "128")
    name = base_model.name
    try:
        api = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        raw_file = api.files.with_raw_response.create(
            file=("taught.jsonl", taught_data()), purpose="fine-tune"
        )
        assert_valid(raw_file.http_response.json(), "OpenAIFile")
        job = api.fine_tuning.jobs.create(
            model=name,
            training_file=raw_file.parse().id,
            suffix="banana",
            seed=7,
            hyperparameters={"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 20},
        )
        deadline = time.monotonic() + 120
        while (
            job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline
        ):
            time.sleep(0.5)
            job = api.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        assert_valid(httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job.id}").json(), "FineTuningJob")

        ask = {"messages": [{"role": "user", "content": "What is 2 + 2? (7)"}], "temperature": 0}
        tuned = api.chat.completions.create(model=job.fine_tuned_model, max_tokens=12, **ask)
        base = api.chat.completions.create(model=name, max_tokens=12, **ask)
        assert tuned.choices[0].message.content.startswith(ANSWER[:15])
        assert "banana" not in base.choices[0].message.content

        assert api.models.delete(job.fine_tuned_model).deleted
        try:
            api.chat.completions.create(model=job.fine_tuned_model, max_tokens=2, **ask)
            raise AssertionError("the deleted model still answers")
        except openai.NotFoundError:
            pass
    finally:
        srv.stop()
