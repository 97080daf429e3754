"""Micro-batching for one-shot models (embeddings): requests that arrive together run as one
forward pass, on a thread of its own. Plain Python: the model is a function passed in."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

EmbedFn = Callable[[Sequence[Sequence[int]]], list[list[float]]]


@dataclass(frozen=True, slots=True)
class Job:
    inputs: tuple[tuple[int, ...], ...]
    done: Future


class MicroBatcher:
    def __init__(self, fn: EmbedFn, max_batch_tokens: int = 8192) -> None:
        self.fn = fn
        self.max_batch_tokens = max_batch_tokens
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.batches = 0  # forward passes run, for tests and metrics
        self._thread = threading.Thread(target=self._run, name="genserve-embed", daemon=True)
        self._thread.start()

    async def submit(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        job = Job(tuple(tuple(i) for i in inputs), Future())
        self.inbox.put(job)
        return await asyncio.wrap_future(job.done)

    def stop(self) -> None:
        self.inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self._execute(jobs)

    def _take(self) -> list[Job] | None:
        """Block for one job, then everything already waiting, up to the token budget."""
        first = self.inbox.get()
        if first is None:
            return None
        jobs, tokens = [first], sum(map(len, first.inputs))
        while tokens < self.max_batch_tokens:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.inbox.put(None)  # stop after this batch
                break
            jobs.append(job)
            tokens += sum(map(len, job.inputs))
        return jobs

    def _execute(self, jobs: list[Job]) -> None:
        flat = [x for job in jobs for x in job.inputs]
        try:
            vectors = self.fn(flat)
        except Exception as e:  # noqa: BLE001 - every caller in the batch gets it
            for job in jobs:
                job.done.set_exception(e)
            return
        self.batches += 1
        start = 0
        for job in jobs:
            job.done.set_result(vectors[start : start + len(job.inputs)])
            start += len(job.inputs)
