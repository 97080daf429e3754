"""A full disk (issue 13): uploads and job creation answer 507 in OpenAI's shape, and the job
runner survives a failed write, then resumes the interrupted job and the queued one once space
returns, without a restart.

In-process, so that the disk can fill on cue: SQLite's writes and the upload's staging write
are patched to fail as a full disk makes them fail (SQLITE_FULL, ENOSPC). The app, its
storage and its job manager are the real ones; the training worker is a script, launched
through the manager's launcher hook, so the test controls when it writes.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from genserve.api.app import create_app
from genserve.config import EngineConfig, ModelConfig, ServerConfig, StorageConfig
from genserve.storage.db import Database
from genserve.storage.files import FileStore
from genserve.training.worker import Finished, Metrics, Started, dump
from tests.conformance import assert_valid
from tests.server import wait_until

DATA = b'{"messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "1"}]}\n'
GATE = object()  # in a script: wait until the test opens the gate


@pytest.fixture()
def disk(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set: every database write and every upload fails as on a full disk."""
    full = threading.Event()
    transaction, stage = Database.transaction, FileStore.stage

    @contextmanager
    def full_transaction(self: Database):
        if full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        with transaction(self) as cur:
            yield cur

    def full_stage(self: FileStore, src, max_bytes: int):  # noqa: ANN001, ANN202
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return stage(self, src, max_bytes)

    monkeypatch.setattr(Database, "transaction", full_transaction)
    monkeypatch.setattr(FileStore, "stage", full_stage)
    return full


class ScriptedWorker:
    """A training worker as the manager sees it (manager.WorkerProcess), playing a script."""

    def __init__(self, script: list, gate: threading.Event, killed: threading.Event) -> None:
        self.script, self.gate, self.killed = script, gate, killed
        self.returncode: int | None = None
        self.pid = None
        self.stdout = self._lines()

    async def _lines(self):  # noqa: ANN202
        for message in self.script:
            if message is GATE:
                await asyncio.to_thread(self.gate.wait, 60)
                continue
            yield (dump(message) + "\n").encode()
        self.returncode = 0

    def kill(self) -> None:
        self.returncode = -9
        self.killed.set()

    async def wait(self) -> int:
        return self.returncode if self.returncode is not None else 0


class Launcher:
    """The first run writes a metrics event once the gate opens; later runs finish at once."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.gate, self.killed = threading.Event(), threading.Event()

    async def __call__(self, spec_path: Path, threads: int) -> ScriptedWorker:
        self.jobs.append(spec_path.parent.name)
        started = Started(total_steps=2, examples=1, valid_examples=0, truncated=0, start_step=0)
        if len(self.jobs) == 1:
            script = [started, GATE, Metrics(step=1, data={"step": 1, "train_loss": 1.0})]
        else:
            script = [started, Finished(trained_tokens=1, adapter_dir=str(spec_path.parent))]
        return ScriptedWorker(script, self.gate, self.killed)


@pytest.fixture()
def app_and_launcher(tiny_model_dir: Path, tmp_path: Path):  # noqa: ANN201
    config = ServerConfig(
        model=ModelConfig(ref=str(tiny_model_dir), embedding_model=None),
        engine=EngineConfig(max_batch_size=2, max_model_len=64),
        storage=StorageConfig(data_dir=str(tmp_path / "data"), models_dir=str(tmp_path / "m")),
    )
    app = create_app(config)
    launcher = Launcher()
    app.state.runtime.training_launcher = launcher
    return app, launcher


def upload(http: TestClient):  # noqa: ANN201
    return http.post("/v1/files", files={"file": ("t.jsonl", DATA)}, data={"purpose": "fine-tune"})


def create_job(http: TestClient, file_id: str):  # noqa: ANN201
    return http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})


def assert_507(response) -> None:  # noqa: ANN001
    assert response.status_code == 507, response.text
    assert_valid(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == "insufficient_storage"


def test_full_disk_is_507_and_the_runner_resumes(app_and_launcher, disk) -> None:  # noqa: ANN001
    app, launcher = app_and_launcher
    with TestClient(app) as http:
        wait_until(lambda: http.get("/health").status_code == 200, timeout=120)
        file_id = upload(http).json()["id"]
        first = create_job(http, file_id).json()["id"]
        wait_until(lambda: launcher.jobs == [first])
        second = create_job(http, file_id).json()["id"]  # queued behind the first
        job = lambda job_id: http.get(f"/v1/fine_tuning/jobs/{job_id}").json()  # noqa: E731
        wait_until(lambda: job(second)["status"] == "queued")

        disk.set()
        assert_507(upload(http))
        assert_507(create_job(http, file_id))
        launcher.gate.set()  # the worker reports a metric: its event cannot be written
        wait_until(launcher.killed.is_set)  # the runner stopped the run it could not record
        assert job(first)["status"] == "running"

        disk.clear()  # space returns: no restart
        wait_until(lambda: job(second)["status"] == "succeeded", timeout=60)
        assert job(first)["status"] == "succeeded"
        assert launcher.jobs == [first, first, second]  # resumed, then the queued one
        events = http.get(f"/v1/fine_tuning/jobs/{first}/events?limit=100").json()["data"]
        assert any("Storage was full" in e["message"] for e in events)
        assert upload(http).status_code == 200
