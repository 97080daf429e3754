"""The one thread that touches the model: it builds the worker, then runs the engine loop.

Why one thread for both: on CPU, a runner built (weights prepacked for oneDNN, KV cache
allocated) on one thread and stepped on another ran 25% slower at 32 streams on the 2-core
machine this project is measured on (engine alone, SmolLM2-135M shape: 322 -> 428 tok/s; decode
step 68 -> 55 ms, with elementwise and indexing kernels 3-6x slower). Building it where it
will run costs nothing, so the model never crosses threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class _Job:
    fn: Callable[[], Any]
    done: Future


class EngineThread:
    """A daemon thread running the callables given to it, one after another, in order."""

    def __init__(self, name: str = "genserve-engine") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Daemon: a server that exits without stopping its engine must not hang at exit.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        done: Future = Future()
        self._jobs.put(_Job(fn, done))
        return done

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn there and wait; its exception is raised here."""
        return self.submit(fn).result()

    def close(self, timeout: float | None = None) -> None:
        """No more jobs: the thread ends once the current one returns."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.done.set_running_or_notify_cancel():
                continue
            try:
                job.done.set_result(job.fn())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on it
                job.done.set_exception(e)
