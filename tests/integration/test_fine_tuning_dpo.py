"""DPO fine-tuning on a live server with the official client: a preference file trains a
`method: dpo` job to `succeeded`, its metrics carry the DPO loss and reward accuracy, the card
echoes the method with beta, and the model answers; files of the other method fail the job."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.integration.test_fine_tuning import MODEL, all_events, training_data, wait_finished
from tests.server import LiveServer, start_server, wait_until
from tests.unit.test_dpo import preference_data


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    live = start_server(tiny_model_dir, tmp_path_factory.mktemp("dpo"), "--max-model-len", "128")
    yield live
    live.stop()


@pytest.fixture()
def api(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def upload(api: openai.OpenAI, data: bytes, name: str = "pairs.jsonl") -> str:
    return api.files.create(file=(name, data), purpose="fine-tune").id


HYPER = {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 10, "beta": 0.2}


@pytest.fixture(scope="module")
def dpo_job(server: LiveServer) -> dict:
    """12 pairs, 4 validation pairs, 2 epochs of 4 steps."""
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    raw = api.fine_tuning.jobs.with_raw_response.create(
        model=MODEL,
        training_file=upload(api, preference_data(12)),
        validation_file=upload(api, preference_data(4), "valid.jsonl"),
        suffix="prefers",
        seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": HYPER}},
    )
    created = raw.http_response.json()
    assert_valid(created, "FineTuningJob")
    assert created["method"] == {"type": "dpo", "dpo": {"hyperparameters": HYPER}}
    return wait_finished(server, raw.parse().id, timeout=60)


def test_dpo_job_succeeds_and_echoes_its_method(dpo_job: dict) -> None:
    assert dpo_job["status"] == "succeeded", dpo_job["error"]
    assert_valid(dpo_job, "FineTuningJob")
    resolved = {**HYPER, "learning_rate_multiplier": 10.0}
    assert dpo_job["method"] == {"type": "dpo", "dpo": {"hyperparameters": resolved}}
    # The deprecated top-level field: the hyperparameters every method shares, no beta.
    assert dpo_job["hyperparameters"] == {k: resolved[k] for k in resolved if k != "beta"}
    assert dpo_job["fine_tuned_model"] == f"ft:{MODEL}:prefers:{dpo_job['id']}"
    assert dpo_job["trained_tokens"] > 0


def test_metrics_events_carry_the_dpo_loss(dpo_job: dict, server: LiveServer) -> None:
    url = f"{server.url}/v1/fine_tuning/jobs/{dpo_job['id']}"
    events = httpx.get(url + "/events", params={"limit": 1000}).json()
    for event in events["data"]:
        assert_valid(event, "FineTuningJobEvent")
    metrics = [e["data"] for e in reversed(events["data"]) if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for m in metrics:
        assert m["train_loss"] > 0 and 0 <= m["train_mean_reward_accuracy"] <= 1
    assert [("valid_loss" in m) for m in metrics] == [False, False, False, True] * 2
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # it learns the preference
    assert metrics[-1]["valid_mean_reward_accuracy"] > 0

    checkpoints = httpx.get(url + "/checkpoints").json()
    assert_valid(checkpoints, "ListFineTuningJobCheckpointsResponse")
    newest = checkpoints["data"][0]
    assert newest["step_number"] == 8
    assert (
        newest["metrics"]["valid_mean_reward_accuracy"] == metrics[-1]["valid_mean_reward_accuracy"]
    )


def test_result_file_reads_the_reward_accuracy(dpo_job: dict, api: openai.OpenAI) -> None:
    text = api.files.content(dpo_job["result_files"][0]).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_reward_accuracy",
    ]  # fmt: skip
    assert all(r["train_accuracy"] for r in rows)  # from train_mean_reward_accuracy
    assert [r["step"] for r in rows if r["valid_mean_reward_accuracy"]] == ["4", "8"]


def test_the_dpo_model_answers(dpo_job: dict, api: openai.OpenAI) -> None:
    model_id = dpo_job["fine_tuned_model"]
    assert api.models.retrieve(model_id).model_extra.get("parent") == MODEL
    reply = api.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "What is 3 + 3?"}], max_tokens=8
    )
    assert reply.model == model_id and reply.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("method", "files", "param", "expected"),
    [
        ("dpo", {"training_file": "chat"}, "training_file", "a dpo job trains on preference"),
        ("supervised", {"training_file": "pairs"}, "training_file", "train with method dpo"),
        (
            "dpo",
            {"training_file": "pairs", "validation_file": "chat"},
            "validation_file",
            "validation_file holds chat examples",
        ),
    ],
)
def test_a_file_of_the_other_method_fails_the_job(
    api: openai.OpenAI, server: LiveServer, method: str, files: dict, param: str, expected: str
) -> None:
    data = {"chat": training_data(2), "pairs": preference_data(2)}
    ids = {k: upload(api, data[v], f"{v}.jsonl") for k, v in files.items()}
    job = api.fine_tuning.jobs.create(model=MODEL, method={"type": method}, **ids)
    done = wait_finished(server, job.id)
    assert_valid(done, "FineTuningJob")
    assert done["status"] == "failed" and done["fine_tuned_model"] is None
    assert (done["error"]["code"], done["error"]["param"]) == (f"invalid_{param}", param)
    assert expected in done["error"]["message"]
    assert any(expected in e.message for e in all_events(api, job.id))


def test_refusals_name_their_param(api: openai.OpenAI) -> None:
    pairs = upload(api, preference_data(2))

    def refused(param: str, method: dict, **kwargs) -> None:  # noqa: ANN003
        with pytest.raises(openai.BadRequestError) as err:
            api.fine_tuning.jobs.create(model=MODEL, training_file=pairs, method=method, **kwargs)
        assert_valid(err.value.response.json(), "ErrorResponse")
        assert err.value.body["param"] == param, err.value.body

    refused("method.type", {"type": "reinforcement"})
    refused(
        "method.dpo.hyperparameters.beta", {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}
    )
    refused("method.supervised", {"type": "dpo", "supervised": {}})
    refused(
        "hyperparameters",
        {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5}}},
        hyperparameters={"n_epochs": 1},
    )


def test_auto_beta_is_a_tenth(api: openai.OpenAI, server: LiveServer) -> None:
    """Resolved when the files are validated, as every "auto" is; the job is then cancelled."""
    job = api.fine_tuning.jobs.create(
        model=MODEL,
        training_file=upload(api, preference_data(2)),
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 50}}},
    )
    assert job.method.dpo.hyperparameters.beta == "auto"

    def resolved() -> dict | None:
        card = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}").json()
        return card["status"] != "validating_files" and card

    card = wait_until(resolved, 30)
    api.fine_tuning.jobs.cancel(job.id)
    assert_valid(card, "FineTuningJob")
    assert card["method"]["dpo"]["hyperparameters"]["beta"] == 0.1


def test_cli_creates_a_dpo_job(server: LiveServer, api: openai.OpenAI, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genserve.cli import app

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(preference_data(4))
    args = ["--file", str(pairs), "--model", MODEL, "--method", "dpo", "--beta", "0.3"]
    args += ["--epochs", "1", "--batch-size", "2", "--base-url", server.url]
    created = CliRunner().invoke(app, ["finetune", "create", *args])
    assert created.exit_code == 0, created.output
    assert "succeeded" in created.output
    job = api.fine_tuning.jobs.list(limit=1).data[0]
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.3
