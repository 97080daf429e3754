"""The whole loop with the official client: upload, fine-tune, chat with the new model (it
gives the answer it was taught, the base does not), delete it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai

from tests.conformance import assert_valid
from tests.server import start_server

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


def test_fine_tune_then_chat_then_delete(tiny_model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_model_dir, tmp_path, "--max-model-len", "128")
    try:
        api = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        raw_file = api.files.with_raw_response.create(
            file=("taught.jsonl", taught_data()), purpose="fine-tune"
        )
        assert_valid(raw_file.http_response.json(), "OpenAIFile")
        job = api.fine_tuning.jobs.create(
            model="tiny-llama",
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
        base = api.chat.completions.create(model="tiny-llama", max_tokens=12, **ask)
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
