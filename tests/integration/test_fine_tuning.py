"""/v1/fine_tuning/jobs on a live server with the tiny model: a job runs to `succeeded` and is
served at once; a SIGKILLed worker resumes from its last checkpoint; a restarted server resumes
its job and serves its adapters again; and the trainer itself reproduces its losses."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from genserve.storage.db import open_database
from genserve.storage.jobs import JobStore
from tests.conformance import assert_valid
from tests.server import LiveServer, start_server, wait_until
from tests.tiny_model import CHATML

MODEL = "tiny-llama"
TERMINAL = ("succeeded", "failed", "cancelled")


def training_data(n: int = 40) -> bytes:
    lines = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}"},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


DATA = training_data()


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def upload(api: openai.OpenAI, data: bytes = DATA, name: str = "train.jsonl") -> str:
    return api.files.create(file=(name, data), purpose="fine-tune").id


def raw_job(server: LiveServer, job_id: str) -> dict:
    return httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=10).json()


def wait_finished(server: LiveServer, job_id: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (j := raw_job(server, job_id))["status"] in TERMINAL and j, timeout)


def all_events(api: openai.OpenAI, job_id: str) -> list:
    """Oldest first."""
    return list(reversed(api.fine_tuning.jobs.list_events(job_id, limit=1000).data))


def kill_worker(server: LiveServer, job_id: str) -> int:
    pid = raw_job(server, job_id)["x_genserve_worker_pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"genserve.training.worker" in cmdline  # the right process, not a reused pid
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ft-data")


class Servers:
    """The module's live server, which the restart test stops and starts again on its data."""

    def __init__(self, model: Path, logs: Path, data_dir: Path) -> None:
        self.args = (model, logs, "--data-dir", str(data_dir), "--max-model-len", "128")
        self.live = start_server(*self.args)

    def restart(self) -> None:
        self.live.stop()
        self.live = start_server(*self.args)


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, data_dir: Path, tmp_path_factory) -> Servers:  # noqa: ANN001
    holder = Servers(tiny_model_dir, tmp_path_factory.mktemp("ft-logs"), data_dir)
    yield holder
    holder.live.stop()


@pytest.fixture()
def ft_server(servers: Servers) -> LiveServer:
    return servers.live


@pytest.fixture()
def api(ft_server: LiveServer) -> openai.OpenAI:
    return client_for(ft_server)


@pytest.fixture(scope="module")
def finished_job(servers: Servers) -> dict:
    """One job, run to the end: 40 chat examples, a validation file, 2 epochs of 10 steps."""
    api = client_for(servers.live)
    valid = upload(api, training_data(8), "valid.jsonl")
    hyper = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}
    raw = api.fine_tuning.jobs.with_raw_response.create(
        model=MODEL,
        training_file=upload(api),
        validation_file=valid,
        suffix="adder",
        seed=11,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
    )
    assert_valid(raw.http_response.json(), "FineTuningJob")
    job = raw.parse()
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    return wait_finished(servers.live, job.id, timeout=60)


def test_job_succeeds_with_metrics_and_checkpoints(
    finished_job: dict, api: openai.OpenAI, ft_server: LiveServer, data_dir: Path
) -> None:
    job = finished_job
    assert job["status"] == "succeeded", job["error"]
    assert_valid(job, "FineTuningJob")
    assert job["fine_tuned_model"] == f"ft:{MODEL}:adder:{job['id']}"
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate_multiplier": 10.0,
    }
    assert job["trained_tokens"] > 0 and job["seed"] == 11 and job["finished_at"]

    url = f"{ft_server.url}/v1/fine_tuning/jobs/{job['id']}"
    events = httpx.get(url + "/events", params={"limit": 1000}).json()
    assert_valid(events, "ListFineTuningJobEventsResponse")
    for event in events["data"]:
        assert_valid(event, "FineTuningJobEvent")
    metrics = [e["data"] for e in reversed(events["data"]) if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(m["total_steps"] == 20 and m["train_loss"] > 0 for m in metrics)
    assert "valid_loss" in metrics[9] and "valid_loss" in metrics[19]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # it learns

    checkpoints = httpx.get(url + "/checkpoints").json()
    assert_valid(checkpoints, "ListFineTuningJobCheckpointsResponse")
    assert [c["step_number"] for c in checkpoints["data"]] == [20, 10]  # newest first
    newest = checkpoints["data"][0]
    assert newest["id"].startswith("ftckpt-") and newest["metrics"]["valid_loss"] > 0
    assert newest["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-20"
    job_dir = data_dir / "jobs" / job["id"]
    for folder in ("adapter", "checkpoints/step-10", "checkpoints/step-20"):
        assert (job_dir / folder / "adapter_config.json").exists()
        assert (job_dir / folder / "adapter_model.safetensors").exists()
    # Its own links to its data went with its end: a deleted upload's bytes leave the disk.
    assert (job_dir / "spec.json").exists() and not (job_dir / "data").exists()


def test_result_file_holds_the_step_metrics(finished_job: dict, api: openai.OpenAI) -> None:
    """OpenAI's step_metrics.csv: what `client.files.content(job.result_files[0])` reads."""
    job = api.fine_tuning.jobs.retrieve(finished_job["id"])
    assert len(job.result_files) == 1
    card = api.files.retrieve(job.result_files[0])
    assert card.purpose == "fine-tune-results" and card.filename == "step_metrics.csv"
    rows = list(csv.DictReader(io.StringIO(api.files.content(card.id).text)))
    assert list(rows[0]) == [
        "step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
    ]  # fmt: skip
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert all(float(r["train_loss"]) > 0 and 0 <= float(r["train_accuracy"]) <= 1 for r in rows)
    # Validation scores at each epoch's last step (10 and 20), empty elsewhere.
    assert [r["step"] for r in rows if r["valid_loss"]] == ["10", "20"]
    listed = api.files.list(purpose="fine-tune-results")
    assert card.id in [f.id for f in listed.data]


def test_finished_model_is_served_at_once(finished_job: dict, api: openai.OpenAI) -> None:
    model_id = finished_job["fine_tuned_model"]
    card = api.models.retrieve(model_id)
    assert card.id == model_id and card.model_extra.get("parent") == MODEL
    reply = api.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "What is 3 + 3?"}], max_tokens=8
    )
    assert reply.model == model_id and reply.choices[0].message.content is not None


def test_checkpoints_are_models_too(finished_job: dict, api: openai.OpenAI) -> None:
    """OpenAI's fine_tuned_model_checkpoint names a model one can call (to pick the epoch
    that validated best); it goes with its fine-tuned model, not alone."""
    model_id = finished_job["fine_tuned_model"]
    names = [c.fine_tuned_model_checkpoint for c in api.fine_tuning.jobs.checkpoints.list(
        finished_job["id"]).data]  # fmt: skip
    assert names == [f"{model_id}:ckpt-step-20", f"{model_id}:ckpt-step-10"]
    listed = [m.id for m in api.models.list()]
    prompt = [{"role": "user", "content": "What is 3 + 3?"}]

    def greedy(model: str) -> str:
        r = api.chat.completions.create(model=model, messages=prompt, max_tokens=8, temperature=0)
        assert r.model == model
        return r.choices[0].message.content

    for name in names:
        assert name in listed and api.models.retrieve(name).model_extra["parent"] == MODEL
    # Loaded by its first requests (lazily: a checkpoint costs memory once used), four at once.
    with ThreadPoolExecutor(4) as pool:
        first_epoch = set(pool.map(lambda _: greedy(names[1]), range(4)))
    assert len(first_epoch) == 1  # greedy: one answer
    # The last checkpoint holds the final weights; the first epoch's answers differently.
    assert greedy(names[0]) == greedy(model_id)
    assert first_epoch != {greedy(model_id)}
    with pytest.raises(openai.BadRequestError) as err:
        api.models.delete(names[1])
    assert "deleted with its fine-tuned model" in err.value.body["message"]


def test_list_pages_events_and_cancel_of_finished_job(
    finished_job: dict, api: openai.OpenAI, ft_server: LiveServer
) -> None:
    listing = httpx.get(ft_server.url + "/v1/fine_tuning/jobs", params={"limit": 1}).json()
    assert_valid(listing, "ListPaginatedFineTuningJobsResponse")
    assert finished_job["id"] in [j.id for j in api.fine_tuning.jobs.list()]

    first = api.fine_tuning.jobs.list_events(finished_job["id"], limit=5)
    second = api.fine_tuning.jobs.list_events(finished_job["id"], limit=5, after=first.data[-1].id)
    assert first.has_more and second.data
    assert first.data[-1].created_at >= second.data[0].created_at
    assert not {e.id for e in first.data} & {e.id for e in second.data}

    with pytest.raises(openai.BadRequestError) as err:
        api.fine_tuning.jobs.cancel(finished_job["id"])
    assert_valid(err.value.response.json(), "ErrorResponse")
    assert err.value.body["param"] == "fine_tuning_job_id"


def test_refusals_name_their_param(api: openai.OpenAI, ft_server: LiveServer) -> None:
    def refused(status: type, param: str, **kwargs) -> None:  # noqa: ANN003
        with pytest.raises(status) as err:
            api.fine_tuning.jobs.create(**{"model": MODEL, "training_file": good, **kwargs})
        assert_valid(err.value.response.json(), "ErrorResponse")
        assert err.value.body["param"] == param, err.value.body

    good = upload(api)
    other = api.files.create(file=("b.jsonl", b"{}"), purpose="batch").id
    refused(openai.NotFoundError, "training_file", training_file="file-missing")
    refused(openai.NotFoundError, "validation_file", validation_file="file-missing")
    refused(openai.NotFoundError, "model", model="no-such-model")
    refused(openai.BadRequestError, "training_file", training_file=other)
    refused(openai.BadRequestError, "hyperparameters.n_epochs", hyperparameters={"n_epochs": 0})
    refused(openai.BadRequestError, "method.type", method={"type": "reinforcement"})
    refused(openai.BadRequestError, "suffix", suffix="has:colon")
    for path in ("", "/events", "/checkpoints"):
        r = httpx.get(f"{ft_server.url}/v1/fine_tuning/jobs/ftjob-nope{path}")
        assert r.status_code == 404 and r.json()["error"]["param"] == "fine_tuning_job_id"
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.cancel("ftjob-nope")


def test_a_job_trains_on_after_its_upload_is_deleted(
    api: openai.OpenAI, ft_server: LiveServer
) -> None:
    """Once validated, the job holds its own link to the data (OpenAI's jobs go on when the
    upload is deleted; here the worker failed with the server's file path)."""
    file_id = upload(api, training_data(8))
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    wait_until(lambda: raw_job(ft_server, job.id)["status"] != "validating_files", every=0.02)
    assert api.files.delete(file_id).deleted
    done = wait_finished(ft_server, job.id)
    assert done["status"] == "succeeded", done["error"]


def test_cancel_stops_the_worker(api: openai.OpenAI, ft_server: LiveServer) -> None:
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(api), hyperparameters={"n_epochs": 50}
    )
    pid = wait_until(lambda: raw_job(ft_server, job.id)["x_genserve_worker_pid"])
    cancelled = api.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert (
        not Path(f"/proc/{pid}").exists()
        or b"genserve" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    time.sleep(0.5)
    assert api.fine_tuning.jobs.retrieve(job.id).status == "cancelled"  # the manager agrees


def test_job_that_cannot_train_fails_with_an_error_object(
    api: openai.OpenAI, ft_server: LiveServer
) -> None:
    # Valid at upload, but weight 0 on every assistant turn leaves nothing to learn.
    line = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    line["messages"][1]["weight"] = 0
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(api, (json.dumps(line) + "\n").encode())
    )
    done = wait_finished(ft_server, job.id)
    assert_valid(done, "FineTuningJob")
    assert done["status"] == "failed" and done["fine_tuned_model"] is None
    assert done["error"]["code"] == "invalid_training_file"
    assert done["error"]["param"] == "training_file"
    assert "no example in training_file has a token to learn" in done["error"]["message"]


def test_cli_lists_shows_and_refuses(
    finished_job: dict, ft_server: LiveServer, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from genserve.cli import app

    def cli(*args: str):  # noqa: ANN202
        return CliRunner().invoke(app, ["finetune", *args, "--base-url", ft_server.url])

    listed = cli("list")
    assert listed.exit_code == 0 and finished_job["id"] in listed.output
    shown = cli("show", finished_job["id"])
    assert shown.exit_code == 0 and "The job has successfully completed" in shown.output
    refused = cli("cancel", finished_job["id"])
    assert refused.exit_code == 1 and "param: fine_tuning_job_id" in refused.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    created = cli("create", "--file", str(bad), "--model", MODEL)
    assert created.exit_code == 1 and "line 1: not valid JSON" in created.output


@pytest.fixture(scope="module")
def killed_job(servers: Servers) -> tuple[dict, int, str]:
    """A job whose worker was SIGKILLed right after the first of its six epochs' checkpoints:
    (the finished job, the last checkpoint's step when it was killed, its training file)."""
    api = client_for(servers.live)
    file_id = upload(api)
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, seed=5, hyperparameters={"n_epochs": 6, "batch_size": 1}
    )
    wait_until(lambda: api.fine_tuning.jobs.checkpoints.list(job.id).data, every=0.02)
    kill_worker(servers.live, job.id)
    # Nothing is checkpointed between the kill and the restarted worker's next epoch end.
    last = max(c.step_number for c in api.fine_tuning.jobs.checkpoints.list(job.id).data)
    return wait_finished(servers.live, job.id, timeout=90), last, file_id


def test_sigkilled_worker_resumes_from_its_checkpoint(
    killed_job: tuple[dict, int, str], api: openai.OpenAI
) -> None:
    done, last, file_id = killed_job
    assert done["status"] == "succeeded", done["error"]
    assert last < 240  # killed mid-job (normally right after the first epoch, step 40)
    messages = [e.message for e in all_events(api, done["id"])]
    resumed = (
        f"The training worker was killed by SIGKILL; resuming from the checkpoint at step {last}"
    )
    assert resumed in messages
    assert any(m.endswith(f"continuing at step {last + 1}") for m in messages)
    steps = [c.step_number for c in api.fine_tuning.jobs.checkpoints.list(done["id"]).data]
    assert sorted(steps) == [40, 80, 120, 160, 200, 240]
    assert api.files.content(file_id).read() == DATA  # the upload is intact, byte for byte


def test_restarted_server_resumes_its_job_and_serves_adapters_again(
    servers: Servers, finished_job: dict, killed_job: tuple[dict, int, str], data_dir: Path
) -> None:
    api = client_for(servers.live)
    deleted, kept = finished_job["fine_tuned_model"], killed_job[0]["fine_tuned_model"]
    assert api.models.delete(deleted).deleted
    file_id = upload(api)
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 5, "batch_size": 2}
    )
    wait_until(lambda: api.fine_tuning.jobs.checkpoints.list(job.id).data, every=0.02)
    # Freeze the worker so that the job is certainly mid-way when the server goes down.
    os.kill(raw_job(servers.live, job.id)["x_genserve_worker_pid"], signal.SIGSTOP)
    last = max(c.step_number for c in api.fine_tuning.jobs.checkpoints.list(job.id).data)
    servers.live.stop()
    assert JobStore(open_database(data_dir)).get(job.id).status == "running"

    servers.restart()
    api = client_for(servers.live)
    served = [m.id for m in api.models.list()]
    assert kept in served and deleted not in served  # served again; deleted stays deleted
    # With it its last three checkpoints (of six: one an epoch), as OpenAI keeps them.
    assert {f"{kept}:ckpt-step-{step}" for step in (240, 200, 160)} <= set(served)
    assert f"{kept}:ckpt-step-120" not in served
    assert not [m for m in served if m.startswith(deleted)]  # its checkpoints went with it
    done = wait_finished(servers.live, job.id)
    assert done["status"] == "succeeded", done["error"]
    messages = [e.message for e in all_events(api, job.id)]
    assert f"The server restarted; resuming from the checkpoint at step {last}" in messages
    assert done["fine_tuned_model"] in [m.id for m in api.models.list()]
    assert api.files.content(file_id).read() == DATA


def test_trainer_same_seed_same_losses_and_exact_resume(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """In-process: a checkpointed run resumed mid-way computes the uninterrupted run's losses."""
    import torch

    from genserve.training.trainer import train
    from genserve.training.worker import Checkpointed, Metrics, Started, WorkerSpec

    data = tmp_path / "train.jsonl"
    data.write_bytes(training_data(12))

    def run(name: str, seed: int, resume: str | None = None) -> tuple[list[float], list]:
        spec = WorkerSpec(
            job_id=name, base_path=str(tiny_model_dir), chat_template=CHATML,
            train_file=str(data), n_epochs=2, batch_size=3, learning_rate=2e-3, seed=seed,
            max_len=128, out_dir=str(tmp_path / name), resume_dir=resume,
        )  # fmt: skip
        messages: list = []
        train(spec, messages.append)
        return [m.data["train_loss"] for m in messages if isinstance(m, Metrics)], messages

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses, messages = run("a", seed=1)
        started = next(m for m in messages if isinstance(m, Started))
        assert (started.device, started.precision) == (
            ("cuda:0", "bfloat16 autocast") if torch.cuda.is_available() else ("cpu", "float32")
        )
        assert run("b", seed=1)[0] == losses
        assert run("c", seed=2)[0] != losses
        halfway = next(m for m in messages if isinstance(m, Checkpointed))
        assert halfway.step == 4
        resumed, _ = run("d", seed=1, resume=halfway.path)
    finally:
        torch.set_num_threads(threads)
    assert resumed == losses[4:]
