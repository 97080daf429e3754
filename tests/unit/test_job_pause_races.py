"""Pause against the job's other ends, on the real manager and store with scripted workers: a
pause that comes as the worker finishes leaves the job succeeded; a cancel while it pauses
wins; a worker that cannot take the signal (a Ray task) is stopped and its job paused at its
last checkpoint; a paused job found at start-up stays paused, a pausing one becomes paused."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from genserve.storage.db import open_database
from genserve.storage.files import FileStore
from genserve.storage.jobs import JobStore
from genserve.training.manager import JobManager, JobRequest
from genserve.training.messages import Finished, Metrics, Paused, Started, dump

LINE = json.dumps(
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
)


@dataclass
class Base:
    """The base model as the manager reads it (runtime.models.ServedModel's fields it uses)."""

    path: str = "/nonexistent"
    chat_template: str = ""
    max_len: int = 64


@dataclass
class Serving:
    models: dict = field(default_factory=lambda: {"m": Base()})
    adapters: dict = field(default_factory=dict)

    async def register_adapter(self, spec, lazy: bool = False) -> None:  # noqa: ANN001
        self.adapters[spec.id] = spec


class Worker:
    """Plays its lines as the worker would print them; without a signal (a Ray task), so the
    manager can only kill it."""

    def __init__(self, lines: list) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        for line in lines:
            self.queue.put_nowait(line)
        self.returncode: int | None = None
        self.pid = 1
        self.stdout = self._lines()

    async def _lines(self):  # noqa: ANN202
        while (line := await self.queue.get()) is not None:
            yield (dump(line) + "\n").encode()
        self.returncode = self.returncode if self.returncode is not None else 0

    def kill(self) -> None:
        self.returncode = -9
        self.queue.put_nowait(None)

    async def wait(self) -> int:
        while self.returncode is None:
            await asyncio.sleep(0.01)
        return self.returncode


class SignalWorker(Worker):
    """A local worker: SIGUSR1 makes it print `on_signal`, then exit (unless `exits` is
    False: one still saving its state)."""

    def __init__(self, lines: list, on_signal: list, exits: bool = True) -> None:
        super().__init__(lines)
        self.on_signal, self.exits = on_signal, exits

    def send_signal(self, sig: int) -> None:
        assert sig == signal.SIGUSR1
        for line in self.on_signal:
            self.queue.put_nowait(line)
        if self.exits:
            self.queue.put_nowait(None)


STARTED = Started(total_steps=4, examples=1, valid_examples=0, truncated=0, start_step=0)


class Launcher:
    def __init__(self, make) -> None:  # noqa: ANN001 - (run number) -> Worker
        self.make, self.workers = make, []

    async def __call__(self, spec_path: Path, threads: int) -> Worker:
        worker = self.make(len(self.workers))
        self.workers.append(worker)
        return worker


async def manager_with(tmp_path: Path, launcher: Launcher) -> tuple[JobManager, str]:
    db = open_database(tmp_path)
    files = FileStore(db, tmp_path / "files")
    data = (LINE + "\n").encode()
    record = files.commit(files.stage(io.BytesIO(data), len(data)), "t.jsonl", "fine-tune")
    manager = JobManager(JobStore(db), files, Serving(), tmp_path, threads=1, launch=launcher)
    await manager.start()
    job = manager.create(JobRequest("m", record.id, None, None, 1, {"batch_size": 1}))
    return manager, job.id


async def until(predicate, timeout: float = 10.0):  # noqa: ANN001, ANN201
    for _ in range(int(timeout / 0.01)):
        if value := predicate():
            return value
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


def status(manager: JobManager, job_id: str) -> str:
    return manager.jobs.get(job_id).status


def messages(manager: JobManager, job_id: str) -> list[str]:
    return [e.message for e in manager.jobs.events(job_id, None, 100).data]


@pytest.mark.asyncio
async def test_a_pause_as_the_worker_finishes_leaves_the_job_succeeded(tmp_path: Path) -> None:
    done = Finished(trained_tokens=3, adapter_dir=str(tmp_path))
    launcher = Launcher(lambda _: SignalWorker([STARTED], on_signal=[done]))
    manager, job_id = await manager_with(tmp_path, launcher)
    await until(lambda: launcher.workers)
    assert (await manager.pause(job_id)).status == "pausing"
    await until(lambda: status(manager, job_id) == "succeeded")
    await manager.stop()


@pytest.mark.asyncio
async def test_a_cancel_while_pausing_wins(tmp_path: Path) -> None:
    launcher = Launcher(lambda _: SignalWorker([STARTED], on_signal=[], exits=False))
    manager, job_id = await manager_with(tmp_path, launcher)
    await until(lambda: launcher.workers)
    await manager.pause(job_id)
    assert status(manager, job_id) == "pausing"  # still saving
    assert (await manager.cancel(job_id)).status == "cancelled"
    await until(lambda: launcher.workers[0].returncode == -9)
    await asyncio.sleep(0.1)  # the runner settles the killed worker's run
    assert status(manager, job_id) == "cancelled"
    await manager.stop()


@pytest.mark.asyncio
async def test_a_worker_without_the_signal_is_stopped_and_paused_at_its_checkpoint(
    tmp_path: Path,
) -> None:
    launcher = Launcher(lambda _: Worker([STARTED, Metrics(1, {"step": 1, "train_loss": 1.0})]))
    manager, job_id = await manager_with(tmp_path, launcher)
    await until(lambda: launcher.workers)
    await manager.pause(job_id)
    await until(lambda: status(manager, job_id) == "paused")
    assert "Fine-tuning job paused; it resumes from the start (no checkpoint yet)" in messages(
        manager, job_id
    )
    assert launcher.workers[0].returncode == -9
    await manager.stop()


@pytest.mark.asyncio
async def test_a_signalled_pause_is_recorded_and_a_restart_keeps_it(tmp_path: Path) -> None:
    saved = tmp_path / "jobs"
    launcher = Launcher(lambda _: SignalWorker([STARTED], on_signal=[Paused(2, str(saved))]))
    manager, job_id = await manager_with(tmp_path, launcher)
    await until(lambda: launcher.workers)
    await manager.pause(job_id)
    await until(lambda: status(manager, job_id) == "paused")
    assert "Fine-tuning job paused after step 2" in messages(manager, job_id)
    await manager.stop()
    again = JobManager(manager.jobs, manager.files, Serving(), tmp_path, 1, launch=launcher)
    await again.start()
    await asyncio.sleep(0.1)
    assert status(again, job_id) == "paused" and len(launcher.workers) == 1  # not resumed
    # A server that stopped while its job was pausing finds it paused at start-up.
    manager.jobs.transition(job_id, "pausing", ("paused",))
    await again.stop()
    third = JobManager(manager.jobs, manager.files, Serving(), tmp_path, 1, launch=launcher)
    await third.start()
    assert status(third, job_id) == "paused"
    await third.stop()
