"""The one thread that touches the model: it loads the weights, builds the worker, then runs
the engine loop; and `passing_thread`, for torch work that must not leave threads behind.

Why one thread for all of it: torch's CPU kernels run on OpenMP (GNU libgomp), and libgomp gives
every thread that starts a parallel region a pool of worker threads of its own, kept until that
thread ends. Once the pools' workers outnumber the CPUs, libgomp stops spinning at its barriers
(100 spins instead of 300,000) and its workers sleep on a futex between ops, so every small op of
a decode step pays a wake-up. One more thread that ran one parallel op (a load that copied the
weights on another thread, one embeddings request) was enough on a 2-core machine: the engine's
decode fell from 18.3-22.0 to 10.5-11.1 tok/s at one stream (server A/B, SmolLM2-135M shape,
fp32), with the kernel's context switches taking 18% of the samples instead of 1%, and 25% at 32
streams when only the runner's build ran elsewhere. So the model never crosses threads, and other
torch work runs on a thread that ends with it (its pool goes with it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


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


COMPILE_THREAD = "genserve-compile"  # the thread a --compile-decode compile runs on


def passing_thread(fn: Callable[[], T]) -> T:
    """Run fn on a thread that ends when fn returns (see the module's docstring), and return
    its result or raise its exception here. Costs a thread start (~0.1 ms) per call."""
    done: Future = Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            done.set_exception(e)

    thread = threading.Thread(target=run, name="genserve-passing", daemon=True)
    thread.start()
    thread.join()
    return done.result()
