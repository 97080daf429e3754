"""Pausing and resuming fine-tuning jobs (OpenAI's POST .../pause and .../resume) on a live
server with the tiny model: a running job saves its state between two steps and stops, stays
paused across a server restart, and once resumed trains every remaining step exactly once; a
queued job pauses at once; what cannot be paused or resumed is a 400 naming the job."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.integration.test_fine_tuning import (
    DATA,
    MODEL,
    Servers,
    all_events,
    client_for,
    raw_job,
    training_data,
    upload,
    wait_finished,
)
from tests.server import LiveServer, wait_until

EXAMPLES, EPOCHS = 100, 2
STEPS = EXAMPLES * EPOCHS  # batch 1: long epochs, so the pause most likely lands inside one


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Servers:
    holder = Servers(
        tiny_model_dir, tmp_path_factory.mktemp("pause-logs"), tmp_path_factory.mktemp("data")
    )
    yield holder
    holder.live.stop()


def steps_trained(api: openai.OpenAI, job_id: str) -> list[int]:
    return [e.data["step"] for e in all_events(api, job_id) if e.type == "metrics"]


def status_of(server: LiveServer, job_id: str) -> str:
    return raw_job(server, job_id)["status"]


def test_a_paused_job_resumes_where_it_stopped_even_after_a_restart(servers: Servers) -> None:
    api = client_for(servers.live)
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(api, training_data(EXAMPLES)), seed=3,
        hyperparameters={"n_epochs": EPOCHS, "batch_size": 1},
    )  # fmt: skip
    wait_until(lambda: len(steps_trained(api, job.id)) >= 3, every=0.02)
    # Queued behind it (one job trains at a time): paused at once, never started.
    queued = api.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(api, training_data(8)),
        hyperparameters={"n_epochs": 1, "batch_size": 8},
    )  # fmt: skip
    wait_until(lambda: status_of(servers.live, queued.id) == "queued")
    assert api.fine_tuning.jobs.pause(queued.id).status == "paused"

    pausing = api.fine_tuning.jobs.pause(job.id)
    assert pausing.status in ("pausing", "paused")
    wait_until(lambda: status_of(servers.live, job.id) == "paused")
    assert raw_job(servers.live, job.id)["x_genserve_worker_pid"] is None  # the worker is gone
    assert api.fine_tuning.jobs.pause(job.id).status == "paused"  # again: nothing changes
    done_before = steps_trained(api, job.id)
    assert done_before == list(range(1, len(done_before) + 1)) and len(done_before) < STEPS
    paused_at = done_before[-1]
    assert f"Fine-tuning job paused after step {paused_at}" in messages(api, job.id)

    servers.restart()
    api = client_for(servers.live)
    assert status_of(servers.live, job.id) == "paused"  # a restart resumes nothing paused
    assert status_of(servers.live, queued.id) == "paused"

    resumed = api.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    done = wait_finished(servers.live, job.id, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    # Every step exactly once: none lost at the pause, none trained twice after it.
    assert Counter(steps_trained(api, job.id)) == Counter(range(1, STEPS + 1))
    text = messages(api, job.id)
    # From the pause's state; a pause that came between epochs is the epoch's checkpoint.
    kind = "checkpoint" if paused_at % EXAMPLES == 0 else "pause"
    assert f"Fine-tuning job resumed; it continues from the {kind} at step {paused_at}" in text
    assert any(m.endswith(f"continuing at step {paused_at + 1}") for m in text)
    assert done["fine_tuned_model"] in [m.id for m in api.models.list()]

    # The queued job never ran; cancelled while paused, it is cancelled.
    assert steps_trained(api, queued.id) == []
    assert api.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as caught:
        api.fine_tuning.jobs.resume(queued.id)
    assert caught.value.body["code"] == "invalid_job_state"
    assert caught.value.body["param"] == "fine_tuning_job_id"
    with pytest.raises(openai.BadRequestError) as caught:
        api.fine_tuning.jobs.pause(job.id)
    assert caught.value.body["code"] == "job_already_finished"
    assert "has already succeeded; it cannot be paused" in caught.value.body["message"]


def test_pause_and_resume_of_unknown_or_running_jobs(servers: Servers) -> None:
    api = client_for(servers.live)
    for call in (api.fine_tuning.jobs.pause, api.fine_tuning.jobs.resume):
        with pytest.raises(openai.NotFoundError):
            call("ftjob-nope")
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(api, DATA), hyperparameters={"n_epochs": 2}
    )
    wait_until(lambda: status_of(servers.live, job.id) == "running", every=0.02)
    with pytest.raises(openai.BadRequestError) as caught:
        api.fine_tuning.jobs.resume(job.id)
    assert caught.value.body["code"] == "invalid_job_state"
    assert "is running, not paused" in caught.value.body["message"]
    assert api.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def messages(api: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in all_events(api, job_id)]


def test_the_trainer_resumed_from_a_pause_computes_the_uninterrupted_losses(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """In process: paused after the 2nd of an epoch's 4 steps, resumed from what the pause
    saved, the run trains steps 3..8 exactly as the run that never paused did."""
    import torch

    from genserve.training.messages import PAUSE_DIR, Metrics, Paused, WorkerSpec
    from genserve.training.trainer import RunPaused, train
    from tests.tiny_model import CHATML

    data = tmp_path / "train.jsonl"
    data.write_bytes(training_data(12))

    def spec(name: str, resume: str | None = None) -> WorkerSpec:
        return WorkerSpec(
            job_id=name, base_path=str(tiny_model_dir), chat_template=CHATML,
            train_file=str(data), n_epochs=2, batch_size=3, learning_rate=2e-3, seed=1,
            max_len=128, out_dir=str(tmp_path / name), resume_dir=resume,
        )  # fmt: skip

    def losses(messages: list) -> list[float]:
        return [m.data["train_loss"] for m in messages if isinstance(m, Metrics)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole: list = []
        train(spec("whole"), whole.append)
        cut: list = []
        with pytest.raises(RunPaused):
            train(spec("cut"), cut.append, lambda: len(losses(cut)) == 2)
        resumed: list = []
        train(spec("cut", str(tmp_path / "cut" / PAUSE_DIR)), resumed.append)
    finally:
        torch.set_num_threads(threads)
    assert cut[-1] == Paused(2, str(tmp_path / "cut" / PAUSE_DIR))
    assert losses(cut) == losses(whole)[:2]
    assert losses(resumed) == losses(whole)[2:]
