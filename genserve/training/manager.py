"""The job state machine, in the server's event loop: validate, queue, train, serve.

validating_files -> queued -> running -> succeeded | failed, and cancelled from any state
before those. A queued job pauses at once; a running one goes `pausing` -> `paused`: its worker
(SIGUSR1) saves its state before its next step and exits, and a resumed job is queued again and
continues from that state (a Ray task cannot be signalled: it is cancelled and its job resumes
from its last checkpoint). One job trains at a time, in a worker process
(genserve.training.worker; under Ray Serve, launched as a Ray task: genserve.ray.training). The
database is the truth: a job found `running` at start-up was cut off by the server's death and
resumes from its last checkpoint; a worker that dies without a result (a crash, a SIGKILL) is
restarted from the last checkpoint up to MAX_CRASHES times, after which the job fails with an
error object. A finished adapter is loaded into the base model's engine and served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import io
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from genserve.config import is_secret_env
from genserve.runtime.models import AdapterSpec, ServedModel
from genserve.storage.files import FileRecord, FileStore
from genserve.storage.jobs import ACTIVE, TERMINAL, JobError, JobRecord, JobStore
from genserve.storage.space import is_disk_full
from genserve.training import dataset
from genserve.training.messages import (
    DEFAULT_BETA,
    PAUSE_DIR,
    Checkpointed,
    Failed,
    Finished,
    Message,
    Metrics,
    Paused,
    Started,
    WorkerSpec,
    dump,
    load,
)

log = logging.getLogger(__name__)

MAX_CRASHES = 2  # a third worker death without a result fails the job
BASE_LEARNING_RATE = 2e-4  # LoRA learning rate at learning_rate_multiplier 1 ("auto")
AUTO_EPOCHS = 3
# A full disk pauses the runner: it probes with a write after these waits (doubling), then
# resumes the job from its last recorded checkpoint.
SPACE_FIRST_WAIT_S = 0.5
SPACE_MAX_WAIT_S = 30.0
DISK_FULL_CODE = "insufficient_storage"  # a worker's Failed.code when its disk filled up


# OpenAI keeps (and serves) the checkpoints of a job's last three epochs.
CHECKPOINTS_SERVED = 3


def checkpoint_model_id(model_id: str, step: int) -> str:
    """A checkpoint's model: "ft:<base>:<suffix>:<job>:ckpt-step-<step>", as OpenAI names it."""
    return f"{model_id}:ckpt-step-{step}"


class JobFinishedError(ValueError):
    """The job has already ended; there is nothing left to cancel."""


class JobStateError(ValueError):
    """The job is not in a state the request applies to (resume a job that is not paused)."""


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A validated POST /v1/fine_tuning/jobs: files exist, the model is served."""

    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int | None
    hyperparameters: dict[str, Any]  # each value an int/float or "auto"
    metadata: dict[str, str] | None = None
    project: str = "default"  # of the key that asked: the job, its files and model are its own
    method: str = "supervised"  # or "dpo": hyperparameters then carry beta too


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one worker run ended."""

    finished: Finished | None
    failed: Failed | None
    returncode: int
    paused: Paused | None = None


def resolve_hyperparameters(
    requested: dict[str, Any], examples: int, method: str = "supervised"
) -> dict[str, Any]:
    """ "auto" -> numbers: 3 epochs, 1 example per batch per 50 (1..8), multiplier 1; for dpo,
    beta 0.1 (an example is then a preference pair)."""
    auto_batch = min(8, max(1, round(examples / 50)))
    pick = {"n_epochs": AUTO_EPOCHS, "batch_size": auto_batch, "learning_rate_multiplier": 1.0}
    if method == "dpo":
        pick["beta"] = DEFAULT_BETA
    return {k: pick[k] if requested.get(k, "auto") == "auto" else requested[k] for k in pick}


def fine_tuned_model_id(job: JobRecord) -> str:
    return f"ft:{job.model}:{job.suffix or 'genserve'}:{job.id}"


class WorkerProcess(Protocol):
    """A running training worker as the manager sees it: an asyncio subprocess, or anything
    that behaves like one (genserve.ray.training runs it as a Ray task)."""

    stdout: AsyncIterable[bytes]  # the worker's message lines
    returncode: int | None
    pid: int | None

    def kill(self) -> None: ...

    async def wait(self) -> int: ...


Launcher = Callable[[Path, int], Awaitable[WorkerProcess]]  # (spec path, torch threads)


def worker_env(threads: int) -> dict[str, str]:
    """A worker trains, it never answers the API: it gets none of the server's keys (`serve`
    dropped them from its environment already; a server built otherwise, or a Ray task's
    node, may still hold them)."""
    env = {k: v for k, v in os.environ.items() if not is_secret_env(k)}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    return env


def worker_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "genserve.training.worker", "--spec", str(spec_path)]


async def launch_subprocess(spec_path: Path, threads: int) -> asyncio.subprocess.Process:
    """The default: the worker as this server's child process, its stderr in worker.log."""
    with (spec_path.parent / "worker.log").open("ab") as worker_log:
        return await asyncio.create_subprocess_exec(
            *worker_command(spec_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=worker_log,
            env=worker_env(threads),
            start_new_session=True,  # a Ctrl-C at the server's terminal is the server's
        )


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


class Serving(Protocol):
    """What the manager needs of the runtime (genserve.runtime.runtime.Runtime): the base
    models it trains on, and a way to serve what it trained."""

    models: dict[str, ServedModel]
    adapters: dict[str, AdapterSpec]

    async def register_adapter(self, spec: AdapterSpec, lazy: bool = False) -> None: ...


class JobManager:
    def __init__(
        self,
        jobs: JobStore,
        files: FileStore,
        services: Serving,
        data_dir: Path,
        threads: int,
        launch: Launcher | None = None,
        device: str = "auto",  # the server's --device: the worker picks the same way
    ) -> None:
        self.jobs = jobs
        self.launch = launch or launch_subprocess
        self.files = files
        self.services = services
        self.root = data_dir / "jobs"
        self.threads = threads
        self.device = device
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._procs: dict[str, WorkerProcess] = {}
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None
        self._stopping = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, resume: bool = True) -> None:
        """Serve the adapters that survived the last run, then pick up unfinished jobs."""
        for job in self.jobs.served_adapters():
            await self._serve_again(job)
        self._runner = asyncio.create_task(self._run_forever())
        if not resume:
            return
        for job in self.jobs.with_status("pausing"):  # the server stopped before its worker did
            self._mark_paused(job.id, None)
        for job in self.jobs.with_status("validating_files"):
            self._spawn(self._until_stored(job.id, self._validate))
        for job in self.jobs.with_status("queued", "running"):
            if job.status == "running":
                where = self._resume_point(job.id)
                self._note(job.id, f"The server restarted; resuming from {where}")
            self._queue.put_nowait(job.id)

    async def stop(self) -> None:
        """Stop the worker; its job stays `running` and resumes when the server starts again."""
        self._stopping = True
        for job_id, proc in list(self._procs.items()):
            self._note(job_id, "The server is stopping; the job resumes on restart")
            await _terminate(proc)
        for task in [self._runner, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_model_served(self, model_id: str) -> None:
        """A base model was loaded (through the registry, at start-up or later): serve the
        fine-tuned models trained on it that are not served (they were restored before it
        loaded, unloaded with it, or finished while it was not loaded)."""
        for job in self.jobs.served_adapters():
            if job.model == model_id and job.fine_tuned_model not in self.services.adapters:
                await self._serve_again(job)

    async def _serve_again(self, job: JobRecord) -> None:
        if job.model not in self.services.models:  # on_model_served serves it when it loads
            log.info("%s is served once its base %s is loaded", job.fine_tuned_model, job.model)
            return
        try:
            await self.services.register_adapter(self._adapter_spec(job, job.fine_tuned_model))
        except Exception:  # noqa: BLE001 - one bad adapter must not stop the server starting
            log.exception("could not serve %s again", job.fine_tuned_model)
            return
        await self._serve_checkpoints(job, job.fine_tuned_model)

    async def _serve_checkpoints(self, job: JobRecord, model_id: str) -> None:
        """The job's last CHECKPOINTS_SERVED checkpoints, each a model of its own (OpenAI's
        `fine_tuned_model_checkpoint`, usable as a model: pick the epoch that validated best)."""
        for spec in self._checkpoint_specs(job, model_id):
            try:  # lazily: a checkpoint costs memory only once it is used
                await self.services.register_adapter(spec, lazy=True)
            except Exception:  # noqa: BLE001 - the model itself is served; a checkpoint is extra
                log.exception("could not serve %s", spec.id)

    # --- requests -------------------------------------------------------------------------

    def create(self, request: JobRequest) -> JobRecord:
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        job = JobRecord(
            id=f"ftjob-{secrets.token_hex(12)}",
            model=request.model,
            training_file=request.training_file,
            validation_file=request.validation_file,
            suffix=request.suffix,
            seed=seed,
            hyperparameters=request.hyperparameters,
            created_at=int(time.time()),
            metadata=request.metadata,
            project=request.project,
            method=request.method,
        )
        self.jobs.create(job)
        self._note(job.id, f"Validating training file: {job.training_file}")
        self._spawn(self._until_stored(job.id, self._validate))
        return job

    async def cancel(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.status in TERMINAL:
            raise JobFinishedError(f"Job {job_id} has already {job.status}; it cannot be cancelled")
        if self.jobs.transition(job_id, "cancelled", ACTIVE):
            self._note(job_id, "Fine-tuning job cancelled")
            proc = self._procs.get(job_id)
            if proc is not None:
                await _terminate(proc)
            self._release_inputs(job_id)
        return self.jobs.get(job_id)

    async def pause(self, job_id: str) -> JobRecord:
        """A queued job pauses at once; a running one is asked to stop before its next step
        (`pausing`; the runner marks it `paused` when its worker has exited). Pausing a
        paused or pausing job changes nothing."""
        job = self._get(job_id)
        if job.status in TERMINAL:
            raise JobFinishedError(f"Job {job_id} has already {job.status}; it cannot be paused")
        if job.status == "validating_files":
            raise JobStateError(f"Job {job_id} is validating its files; pause it once it is queued")
        if self.jobs.transition(job_id, "paused", ("queued",)):
            self._note(job_id, "Fine-tuning job paused")
        elif self.jobs.transition(job_id, "pausing", ("running",)):
            self._note(job_id, "Pausing: the job saves its state and stops")
            proc = self._procs.get(job_id)
            if proc is not None:  # none yet: _run_worker sees `pausing` once it has started
                await _ask_to_pause(proc)
        return self.jobs.get(job_id)

    async def resume(self, job_id: str) -> JobRecord:
        """A paused job goes back to the queue; it continues from where it paused."""
        job = self._get(job_id)
        if not self.jobs.transition(job_id, "queued", ("paused",)):
            raise JobStateError(f"Job {job_id} is {job.status}, not paused; it cannot be resumed")
        self._note(job_id, f"Fine-tuning job resumed; it continues from {self._resume_point(job)}")
        self._queue.put_nowait(job_id)
        return self.jobs.get(job_id)

    def _get(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def _mark_paused(self, job_id: str, paused: Paused | None) -> None:
        if not self.jobs.transition(job_id, "paused", ("pausing",)):
            return  # cancelled meanwhile
        if paused is not None:
            self._note(job_id, f"Fine-tuning job paused after step {paused.step}")
        else:  # it stopped before it could save: it resumes from its last checkpoint
            where = self._resume_point(job_id)
            self._note(job_id, f"Fine-tuning job paused; it resumes from {where}")

    def worker_pid(self, job_id: str) -> int | None:
        proc = self._procs.get(job_id)
        return proc.pid if proc is not None else None

    async def on_adapter_deleted(self, model_id: str) -> None:
        """DELETE /v1/models/ft:...: never serve it again, not even after a restart."""
        self.jobs.mark_adapter_deleted(model_id)

    # --- validating_files -> queued -------------------------------------------------------

    async def _validate(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        try:
            summary = await asyncio.to_thread(self._check_files, job)
        except _FileProblem as e:
            self._fail(job_id, JobError(e.code, str(e), e.param))
            return
        hyper = resolve_hyperparameters(job.hyperparameters, summary.examples, job.method)
        self.jobs.set_hyperparameters(job_id, hyper)
        if self.jobs.transition(job_id, "queued", ("validating_files",)):
            self.jobs.add_event(job_id, "Files validated, moving job to queued state")
            self._queue.put_nowait(job_id)
        else:  # cancelled while its files were checked: the links came after its release
            self._release_inputs(job_id)

    def _check_files(self, job: JobRecord) -> dataset.Summary:
        summary = None
        for param, file_id in (
            ("training_file", job.training_file),
            ("validation_file", job.validation_file),
        ):
            if file_id is None:
                continue
            gone = _FileProblem(f"file {file_id} no longer exists", param)
            if self.files.get(file_id) is None:
                raise gone
            try:
                checked = dataset.check_file(self._snapshot(job, param, file_id))
            except FileNotFoundError:  # deleted meanwhile: say so, not the server's path
                raise gone from None
            except dataset.DatasetError as e:
                raise _FileProblem(str(e), param) from e
            if problem := dataset.method_mismatch(job.method, checked.format, param):
                raise _FileProblem(problem, param)
            summary = summary or checked
        return summary

    def _snapshot(self, job: JobRecord, param: str, file_id: str) -> Path:
        """The job's own link to a file's bytes, checked and then trained on: the upload may
        be deleted once the job has it (OpenAI's jobs go on), and the worker reads what was
        checked."""
        return self.files.hold(file_id, self._data_path(job, param))

    def _data_path(self, job: JobRecord, param: str) -> Path:
        return self.root / job.id / "data" / f"{param}.jsonl"

    def _train_path(self, job: JobRecord, param: str, file_id: str) -> str:
        """The snapshot; a job validated before snapshots existed reads the upload itself."""
        snap = self._data_path(job, param)
        return str(snap if snap.exists() else self.files.path(file_id))

    def _fail(self, job_id: str, error: JobError) -> None:
        if self.jobs.transition(job_id, "failed", ACTIVE, error=error):
            self.jobs.add_event(job_id, f"Fine-tuning job failed: {error.message}", level="error")
            log.warning("job %s failed: %s", job_id, error.message)
            self._release_inputs(job_id)

    def _release_inputs(self, job_id: str) -> None:
        """An ended job's own links to its data, and what a pause saved: nothing reads them
        again, and a link kept the bytes of a deleted upload on disk for good."""
        for name in ("data", PAUSE_DIR):
            shutil.rmtree(self.root / job_id / name, ignore_errors=True)

    # --- queued -> running -> succeeded | failed ------------------------------------------

    async def _run_forever(self) -> None:
        while True:
            job_id = await self._queue.get()
            await self._until_stored(job_id, self._run_job)

    # --- storage failures: nothing may stop the runner --------------------------------------

    async def _until_stored(self, job_id: str, step: Callable[[str], Awaitable[None]]) -> None:
        """step(job_id), again once writes succeed if the disk filled up under it (a running
        job resumes from its last recorded checkpoint); any other error fails the job alone."""
        while True:
            try:
                await step(job_id)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one broken job must not stop the queue
                if not is_disk_full(e):
                    self._broke(job_id, e)
                    return
                log.warning("job %s paused: the disk is full (%s)", job_id, e)
            await self._wait_for_space(job_id)

    async def _wait_for_space(self, job_id: str) -> None:
        """Until an event about it can be written: the write is the probe."""
        delay = SPACE_FIRST_WAIT_S
        while True:
            await asyncio.sleep(delay)
            try:
                self.jobs.add_event(job_id, "Storage was full; resuming", level="warn")
                return
            except Exception as e:  # noqa: BLE001 - any failure: not yet
                log.debug("job %s: still cannot write: %s", job_id, e)
            delay = min(2 * delay, SPACE_MAX_WAIT_S)

    def _broke(self, job_id: str, e: Exception) -> None:
        log.exception("job %s broke the manager", job_id, exc_info=e)
        try:
            self._fail(job_id, JobError("internal_error", f"{type(e).__name__}: {e}"))
        except Exception:  # noqa: BLE001 - the runner goes on to the next job regardless
            log.exception("job %s: its failure could not be recorded", job_id)

    def _note(self, job_id: str, message: str, **kw: Any) -> None:
        """An event that informs but decides nothing: a full disk loses it, with a warning."""
        try:
            self.jobs.add_event(job_id, message, **kw)
        except Exception as e:
            if not is_disk_full(e):
                raise
            log.warning("job %s: event not recorded (disk full): %s", job_id, message)

    async def _run_job(self, job_id: str) -> None:
        while True:
            job = self.jobs.get(job_id)
            if job.status == "pausing":  # paused while the disk was full
                self._mark_paused(job_id, None)
                return
            base = self.services.models.get(job.model)
            if base is None:
                msg = f"the base model {job.model} is not served by this server"
                self._fail(job_id, JobError("model_not_available", msg, "model"))
                return
            if not self.jobs.transition(job_id, "running", ("queued", "running")):
                return  # cancelled or paused while it waited
            if await self._settle(job, await self._run_worker(job, base)):
                return

    async def _settle(self, job: JobRecord, outcome: Outcome) -> bool:
        """Act on how a worker run ended; False when the job runs again (after a crash)."""
        status = self.jobs.get(job.id).status
        if self._stopping or status not in ("running", "pausing"):
            return True  # the server stops (the job resumes later) or the job was cancelled
        if outcome.finished is not None:  # done, even if a pause came too late
            await self._succeed(job, outcome.finished)
            return True
        if outcome.failed is not None:
            failed = outcome.failed
            if failed.code == DISK_FULL_CODE:  # not the job's fault: it resumes later
                raise OSError(errno.ENOSPC, failed.message)
            self._fail(job.id, JobError(failed.code, failed.message, failed.param))
            return True
        if status == "pausing":
            self._mark_paused(job.id, outcome.paused)
            return True
        return not self._survive_crash(job.id, outcome.returncode)

    def _survive_crash(self, job_id: str, returncode: int) -> bool:
        crashes = self.jobs.count_crash(job_id)
        what = f"The training worker {describe_exit(returncode)}"
        if crashes > MAX_CRASHES:
            message = f"{what}, {crashes} times; giving up"
            self._fail(job_id, JobError("training_worker_died", message))
            return False
        where = self._resume_point(job_id)
        self.jobs.add_event(job_id, f"{what}; resuming from {where}", level="warn")
        return True

    def _resume_point(self, job: JobRecord | str) -> str:
        job = self._get(job) if isinstance(job, str) else job
        where = self._resume_from(job)
        if where is None:
            return "the start (no checkpoint yet)"
        step, folder = where
        return f"the {'pause' if folder.name == PAUSE_DIR else 'checkpoint'} at step {step}"

    def _resume_from(self, job: JobRecord) -> tuple[int, Path] | None:
        """(step, folder) the next run starts from: the last checkpoint, or the state a pause
        saved after it."""
        job_dir = self.root / job.id
        best = None
        if (ckpt := self.jobs.last_checkpoint(job.id)) is not None:
            # By folder name under this job's dir: the data dir may have moved since.
            best = (ckpt.step, job_dir / "checkpoints" / Path(ckpt.path).name)
        paused = _saved_step(job_dir / PAUSE_DIR)
        if paused is not None and (best is None or paused > best[0]):
            best = (paused, job_dir / PAUSE_DIR)
        return best

    async def _run_worker(self, job: JobRecord, base: ServedModel) -> Outcome:
        spec_path = self._write_spec(job, base)
        proc = await self.launch(spec_path, self.threads)
        self._procs[job.id] = proc
        where = getattr(proc, "where", None)
        if where:
            self.jobs.add_event(job.id, f"Training {where}")
        status = self.jobs.get(job.id).status
        if status == "pausing":  # paused while it was being started
            await _ask_to_pause(proc)
        elif status != "running":
            await _terminate(proc)  # cancelled while it was being started
        finished = failed = paused = None
        try:
            async for line in proc.stdout:
                message = self._read(job.id, line)
                finished = message if isinstance(message, Finished) else finished
                failed = message if isinstance(message, Failed) else failed
                paused = message if isinstance(message, Paused) else paused
            returncode = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled (server stopping): do not leave it behind
                await _terminate(proc)
            self._procs.pop(job.id, None)
        return Outcome(finished, failed, returncode, paused)

    def _write_spec(self, job: JobRecord, base: ServedModel) -> Path:
        job_dir = self.root / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        hyper = job.hyperparameters
        resume = self._resume_from(job)
        spec = WorkerSpec(
            job_id=job.id,
            base_path=str(base.path),
            chat_template=base.chat_template,
            train_file=self._train_path(job, "training_file", job.training_file),
            valid_file=(
                self._train_path(job, "validation_file", job.validation_file)
                if job.validation_file
                else None
            ),
            n_epochs=hyper["n_epochs"],
            batch_size=hyper["batch_size"],
            learning_rate=BASE_LEARNING_RATE * hyper["learning_rate_multiplier"],
            seed=job.seed,
            max_len=base.max_len,
            out_dir=str(job_dir),
            resume_dir=str(resume[1]) if resume else None,
            threads=self.threads,
            device=self.device,
            method=job.method,
            beta=hyper.get("beta", DEFAULT_BETA),
        )
        path = job_dir / "spec.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(spec.model_dump_json(indent=2))
        os.replace(tmp, path)
        return path

    def _read(self, job_id: str, line: bytes) -> Message | None:
        try:
            message = load(line)
        except ValueError:
            log.warning("job %s: %s", job_id, line[:200])
            return None
        self._record(job_id, message)
        return message

    def _record(self, job_id: str, message: Message) -> None:
        """A worker message -> the job's events and checkpoints."""
        if isinstance(message, Started):
            self.jobs.add_event(job_id, _started_text(message))
        elif isinstance(message, Metrics):
            self.jobs.add_event(job_id, _metrics_text(message), type="metrics", data=message.data)
        elif isinstance(message, Checkpointed):
            self.jobs.add_checkpoint(
                job_id, message.step, message.epoch, message.path, message.metrics
            )
            self.jobs.add_event(job_id, f"Checkpoint created at step {message.step}")
        elif not isinstance(message, Finished | Failed):
            log.debug("job %s: %s", job_id, dump(message))

    async def _succeed(self, job: JobRecord, finished: Finished) -> None:
        model_id = fine_tuned_model_id(job)
        self.jobs.add_event(job.id, f"New fine-tuned model created: {model_id}")
        if job.model not in self.services.models:  # unloaded while it trained
            later = f"The base model {job.model} is not loaded; {model_id} is served once it is"
            self._note(job.id, later, level="warn")
        else:
            try:
                await self.services.register_adapter(self._adapter_spec(job, model_id))
            except Exception as e:  # noqa: BLE001 - trained and saved; serving is another matter
                log.exception("job %s: could not serve %s", job.id, model_id)
                self._note(job.id, f"The model could not be served yet: {e}", level="warn")
            else:
                await self._serve_checkpoints(job, model_id)
        fields = {"fine_tuned_model": model_id, "trained_tokens": finished.trained_tokens}
        try:
            results = await asyncio.to_thread(self._write_results, job)
        except OSError as e:  # the model is trained and served; a lost CSV must not fail it
            log.exception("job %s: could not write its result file", job.id)
            self.jobs.add_event(job.id, f"The result file could not be written: {e}", level="warn")
            results = None
        else:
            fields["result_files"] = (results.id,)
        if self.jobs.transition(job.id, "succeeded", ("running", "pausing"), **fields):
            self.jobs.add_event(job.id, "The job has successfully completed")
            self._release_inputs(job.id)
            if model_id not in self.services.adapters and job.model in self.services.models:
                await self.on_model_served(job.model)  # its base came back meanwhile
        elif results is not None:  # cancelled meanwhile: the job keeps no results
            self.files.delete(results.id)

    def _write_results(self, job: JobRecord) -> FileRecord:
        """OpenAI's step_metrics.csv, as a file of purpose fine-tune-results, owned by the
        job's project (outside its quota: the job was admitted, its results must not fail it).
        Blocking."""
        data = results_csv(self.jobs.metrics(job.id), job.method).encode()
        staged = self.files.stage(io.BytesIO(data), max_bytes=len(data))
        return self.files.commit(staged, RESULTS_FILENAME, "fine-tune-results", job.project)

    def _checkpoint_specs(self, job: JobRecord, model_id: str) -> list[AdapterSpec]:
        newest = self.jobs.checkpoints(job.id, None, CHECKPOINTS_SERVED).data
        return [
            AdapterSpec(
                checkpoint_model_id(model_id, c.step),
                job.model,
                Path(c.path),
                c.created_at,
                project=job.project,
                checkpoint_of=model_id,
            )  # fmt: skip
            for c in newest
        ]

    def _adapter_spec(self, job: JobRecord, model_id: str) -> AdapterSpec:
        created = job.finished_at or int(time.time())
        path = self.root / job.id / "adapter"
        return AdapterSpec(model_id, job.model, path, created, project=job.project)


RESULTS_FILENAME = "step_metrics.csv"
# OpenAI's columns; a validation score is empty at the steps where none was computed.
RESULTS_COLUMNS = (
    "step",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
)
# A DPO job's accuracy is the share of pairs whose preferred output has the higher reward.
DPO_RESULTS_COLUMNS = (*RESULTS_COLUMNS[:-1], "valid_mean_reward_accuracy")
_FROM_EVENT = {
    "supervised": {"train_accuracy": "train_mean_token_accuracy"},
    "dpo": {"train_accuracy": "train_mean_reward_accuracy"},
}


def results_csv(metrics: list[dict[str, Any]], method: str = "supervised") -> str:
    columns = DPO_RESULTS_COLUMNS if method == "dpo" else RESULTS_COLUMNS
    renamed = _FROM_EVENT[method]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for data in metrics:
        writer.writerow([_cell(data.get(renamed.get(c, c))) for c in columns])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{float(value):.5f}"


class _FileProblem(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = f"invalid_{param}"


async def _ask_to_pause(proc: WorkerProcess) -> None:
    """SIGUSR1: the worker saves its state before its next step and exits. A worker that
    cannot take a signal (a Ray task) is stopped; its job resumes from its last checkpoint."""
    send = getattr(proc, "send_signal", None)
    if send is None:
        await _terminate(proc)
        return
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGUSR1)


def _saved_step(folder: Path) -> int | None:
    """The step a saved state (a pause's) holds, or None when there is none whole."""
    try:
        return int(json.loads((folder / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def _terminate(proc: WorkerProcess) -> None:
    """SIGKILL: the worker holds nothing worth flushing (checkpoints are renamed into place
    whole), and unlike SIGTERM it also ends a stopped (SIGSTOPed) process at once."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


def _started_text(m: Started) -> str:
    text = f"Fine-tuning job started: {m.examples} examples, {m.total_steps} steps"
    text += f", on {m.device} ({m.precision})"
    if m.start_step:
        text += f", continuing at step {m.start_step + 1}"
    if m.truncated:
        text += f"; {m.truncated} examples were cut to the model's context"
    if m.skipped:
        text += f"; {m.skipped} examples had nothing left to learn once cut and were skipped"
    return text


def _metrics_text(m: Metrics) -> str:
    loss = m.data["train_loss"]
    text = f"Step {m.step}/{m.data.get('total_steps', '?')}: training loss={loss:.4f}"
    if "valid_loss" in m.data:
        text += f", validation loss={m.data['valid_loss']:.4f}"
    return text
