"""Fine-tuning jobs as Ray tasks: the control replica's JobManager launches each run of the
training worker (genserve.training.worker) as a Ray task needing `training.threads` CPUs, on
whichever node Ray schedules it; the task runs the worker as its own child process, as the
plain server does, and streams the worker's message lines back (a streaming generator).
The job's folder is on the shared --data-dir, so every node reads the spec and writes the
checkpoints, the adapter and worker.log where the control replica finds them.

RayWorkerProcess gives the manager the interface of an asyncio subprocess (stdout, wait,
kill, returncode, pid), so its monitoring is unchanged: a task that ends without a result
(its worker or node died) is resumed from the last checkpoint, a cancelled job or a stopping
server cancels the task (force: its Ray worker exits, and the training process with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genserve.training.manager import worker_command, worker_env

log = logging.getLogger(__name__)

TASK_NAME = "genserve-training"


@dataclass(frozen=True, slots=True)
class Launched:
    pid: int  # the training process, on `host`
    host: str
    node_id: str


@dataclass(frozen=True, slots=True)
class Exited:
    returncode: int


def train_job(spec_path: str, threads: int) -> Iterator[Any]:
    """The Ray task: run the worker on this node; yield Launched, its lines, then Exited."""
    import socket

    import ray

    spec = Path(spec_path)
    with (spec.parent / "worker.log").open("ab") as worker_log:
        proc = subprocess.Popen(
            worker_command(spec),
            stdout=subprocess.PIPE,
            stderr=worker_log,
            env=worker_env(threads),
            start_new_session=True,
        )
    try:
        node = ray.get_runtime_context().get_node_id()
        yield Launched(proc.pid, socket.gethostname(), node)
        assert proc.stdout is not None
        for line in proc.stdout:  # noqa: UP028 - `yield from` fails: Ray calls send()
            yield line
        yield Exited(proc.wait())
    finally:  # cancelled, or the generator dropped: the worker does not outlive the task
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class RayWorkerProcess:
    """A training worker running as a Ray task, seen as an asyncio subprocess."""

    def __init__(self, ref_generator: Any) -> None:
        self._gen = ref_generator
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
                if isinstance(item, Launched):
                    self.pid = item.pid
                    log.info("training task %s: pid %d on %s", self.task_id, item.pid, item.host)
                elif isinstance(item, Exited):
                    code = item.returncode
                else:
                    self._lines.put_nowait(item)
        except RayTaskError as e:  # the task itself failed (say, no spec on that node)
            log.warning("training task %s failed: %s", self.task_id, e)
            code = 1
        except RayError as e:  # its worker or node died, or it was cancelled
            if not self._killed:
                log.warning("training task %s lost: %s", self.task_id, e)
        finally:
            self.returncode = code if code is not None else -signal.SIGKILL
            self._lines.put_nowait(None)

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


async def launch_ray_task(spec_path: Path, threads: int, gpus: float = 0.0) -> RayWorkerProcess:
    """A JobManager launcher: the run goes to Ray; it may wait there for free CPUs (and its
    GPU share when the model runs on CUDA: Ray hides the GPUs a task did not ask for)."""
    task = _remote_train_job().options(
        num_cpus=threads,
        num_gpus=gpus,
        num_returns="streaming",
        max_retries=0,  # the manager decides: resume from the last checkpoint, or fail
        name=f"{TASK_NAME}:{spec_path.parent.name}",
    )
    return RayWorkerProcess(task.remote(str(spec_path), threads))
