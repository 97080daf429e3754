"""Fine-tuning jobs as Ray tasks: the control replica's JobManager launches each run of the
training worker (genserve.training.worker) as a Ray task needing `training.threads` CPUs, on
whichever node Ray schedules it; the task runs the worker as its own child process, as the
plain server does, and streams the worker's message lines back (a streaming generator).

No filesystem is shared between nodes. What the run reads travels with the task through Ray's
object store (TrainingInputs: the spec, the training and validation files, the checkpoint to
resume from) and is written to a scratch dir on the task's node; what it writes comes back on
the same stream: each checkpoint and the adapter as a Folder just before the message naming
it, which then names it relative to the job's folder, and the worker's log at the end. The
control replica writes them under its own job folder, where the manager finds them. The base
model is read where the engine replicas read it (--model: a path every node has, or a hub id).

RayWorkerProcess gives the manager the interface of an asyncio subprocess (stdout, wait,
kill, returncode, pid), so its monitoring is unchanged: a task that ends without a result
(its worker or node died) is resumed from the last checkpoint, a cancelled job or a stopping
server cancels the task (force: its Ray worker exits, and the training process with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genserve.ray.transfer import Folder, inside, pack, unpack
from genserve.training.manager import worker_command, worker_env
from genserve.training.messages import Checkpointed, Finished, WorkerSpec, dump, load

log = logging.getLogger(__name__)

TASK_NAME = "genserve-training"
LOG_NAME = "worker.log"


@dataclass(frozen=True, slots=True)
class TrainingInputs:
    """What one run reads, carried to its node through the object store."""

    spec: WorkerSpec  # with the control replica's paths; rewritten for the task's scratch dir
    train: bytes
    valid: bytes | None = None
    resume: Folder | None = None  # the checkpoint to continue from, relative to the job folder


@dataclass(frozen=True, slots=True)
class Launched:
    pid: int  # the training process, on `host`
    host: str
    node_id: str


@dataclass(frozen=True, slots=True)
class LogTail:
    """The worker's stderr on the task's node, appended to the job's worker.log."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Exited:
    returncode: int


def read_inputs(spec_path: Path) -> TrainingInputs:
    """On the control replica's node: the spec the manager wrote, and the files it names."""
    spec = WorkerSpec.model_validate_json(spec_path.read_text())
    job_dir = Path(spec.out_dir)
    valid = Path(spec.valid_file).read_bytes() if spec.valid_file else None
    resume = None
    if spec.resume_dir:
        resume = pack(Path(spec.resume_dir), Path(spec.resume_dir).relative_to(job_dir).as_posix())
    return TrainingInputs(spec, Path(spec.train_file).read_bytes(), valid, resume)


def materialize(inputs: TrainingInputs, work: Path) -> tuple[Path, Path]:
    """On the task's node: the inputs written under `work`; (spec path, job folder)."""
    job_dir = work / "job"
    job_dir.mkdir(parents=True)
    train = work / "train.jsonl"
    train.write_bytes(inputs.train)
    changes: dict[str, Any] = {"train_file": str(train), "out_dir": str(job_dir)}
    if inputs.valid is not None:
        valid = work / "valid.jsonl"
        valid.write_bytes(inputs.valid)
        changes["valid_file"] = str(valid)
    if inputs.resume is not None:
        changes["resume_dir"] = str(unpack(inputs.resume, job_dir))
    spec_path = job_dir / "spec.json"
    spec_path.write_text(inputs.spec.model_copy(update=changes).model_dump_json(indent=2))
    return spec_path, job_dir


def outgoing(line: bytes, job_dir: Path) -> list[Folder | bytes]:
    """A worker line as it leaves the task's node: a message naming a folder is preceded by
    that folder, and names it relative to the job's folder."""
    try:
        message = load(line)
    except ValueError:
        return [line]
    if isinstance(message, Checkpointed):
        rel = Path(message.path).relative_to(job_dir).as_posix()
        folder, message = Path(message.path), dataclasses.replace(message, path=rel)
    elif isinstance(message, Finished):
        rel = Path(message.adapter_dir).relative_to(job_dir).as_posix()
        folder, message = Path(message.adapter_dir), dataclasses.replace(message, adapter_dir=rel)
    else:
        return [line]
    return [pack(folder, rel), (dump(message) + "\n").encode()]


def incoming(line: bytes, job_dir: Path) -> bytes:
    """The same line on the control replica: the folder it names, now under job_dir."""
    try:
        message = load(line)
    except ValueError:
        return line
    if isinstance(message, Checkpointed):
        message = dataclasses.replace(message, path=str(inside(job_dir, message.path)))
    elif isinstance(message, Finished):
        adapter = str(inside(job_dir, message.adapter_dir))
        message = dataclasses.replace(message, adapter_dir=adapter)
    else:
        return line
    return (dump(message) + "\n").encode()


def train_job(inputs: TrainingInputs, threads: int) -> Iterator[Any]:
    """The Ray task: run the worker on this node in a scratch dir (under TMPDIR); yield
    Launched, its lines and folders, its log, then Exited."""
    import socket

    import ray

    work = Path(tempfile.mkdtemp(prefix="genserve-train-"))
    proc = None
    try:
        spec_path, job_dir = materialize(inputs, work)
        with (work / LOG_NAME).open("ab") as worker_log:
            proc = subprocess.Popen(
                worker_command(spec_path), stdout=subprocess.PIPE, stderr=worker_log,
                env=worker_env(threads), start_new_session=True,
            )  # fmt: skip
        node = ray.get_runtime_context().get_node_id()
        yield Launched(proc.pid, socket.gethostname(), node)
        assert proc.stdout is not None
        for line in proc.stdout:
            for item in outgoing(line, job_dir):  # noqa: UP028 - `yield from` fails: Ray calls send()
                yield item
        code = proc.wait()
        yield LogTail((work / LOG_NAME).read_bytes())
        yield Exited(code)
    finally:  # cancelled, or the generator dropped: the worker does not outlive the task
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


class RayWorkerProcess:
    """A training worker running as a Ray task, seen as an asyncio subprocess whose folders
    arrive under `job_dir` (the control replica's) before the lines that name them."""

    def __init__(self, ref_generator: Any, job_dir: Path) -> None:
        self._gen = ref_generator
        self.job_dir = job_dir
        self.task_id = ref_generator.completed().task_id().hex()
        self.where = f"as Ray task {self.task_id}"
        self.pid: int | None = None
        self.returncode: int | None = None
        self._killed = False
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pump = asyncio.create_task(self._run())
        self.stdout: AsyncIterator[bytes] = self._read()

    async def _run(self) -> None:
        from ray.exceptions import RayError, RayTaskError

        code: int | None = None
        try:
            async for ref in self._gen:
                item = await ref
                if isinstance(item, Exited):
                    code = item.returncode
                else:
                    await self._arrived(item)
        except RayTaskError as e:  # the task itself failed (say, its inputs could not be written)
            log.warning("training task %s failed: %s", self.task_id, e)
            code = 1
        except RayError as e:  # its worker or node died, or it was cancelled
            if not self._killed:
                log.warning("training task %s lost: %s", self.task_id, e)
        finally:
            self.returncode = code if code is not None else -signal.SIGKILL
            self._lines.put_nowait(None)

    async def _arrived(self, item: Launched | Folder | LogTail | bytes) -> None:
        if isinstance(item, Launched):
            self.pid = item.pid
            log.info("training task %s: pid %d on %s", self.task_id, item.pid, item.host)
        elif isinstance(item, Folder):
            await asyncio.to_thread(unpack, item, self.job_dir)
        elif isinstance(item, LogTail):
            await asyncio.to_thread(_append, self.job_dir / LOG_NAME, item.data)
        else:
            self._lines.put_nowait(incoming(item, self.job_dir))

    async def _read(self) -> AsyncIterator[bytes]:
        while (line := await self._lines.get()) is not None:
            yield line

    def kill(self) -> None:
        import ray

        if self.returncode is not None:
            raise ProcessLookupError(self.task_id)
        self._killed = True
        with contextlib.suppress(Exception):
            ray.cancel(self._gen, force=True)

    async def wait(self) -> int:
        await asyncio.shield(self._pump)
        assert self.returncode is not None
        return self.returncode


@functools.cache
def _remote_train_job() -> Any:
    import ray

    return ray.remote(train_job)


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


async def launch_ray_task(
    spec_path: Path, threads: int, gpus: float = 0.0, resources: dict[str, float] | None = None
) -> RayWorkerProcess:
    """A JobManager launcher: the run goes to Ray, its inputs with it; it may wait there for
    free CPUs (and its GPU share when the model runs on CUDA: Ray hides the GPUs a task did
    not ask for, and for the custom resources the operator placed training with)."""
    inputs = await asyncio.to_thread(read_inputs, spec_path)
    task = _remote_train_job().options(
        num_cpus=threads,
        num_gpus=gpus,
        resources=resources or {},
        num_returns="streaming",
        max_retries=0,  # the manager decides: resume from the last checkpoint, or fail
        name=f"{TASK_NAME}:{spec_path.parent.name}",
    )
    # The inputs travel as the task's argument: Ray keeps a large one in its object store.
    return RayWorkerProcess(task.remote(inputs, threads), spec_path.parent)
