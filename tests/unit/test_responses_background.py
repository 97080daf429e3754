"""A background response's run without a model: generation events from a stand-in, the store
on SQLite. Its events reach the store before a follower reads past a batch; a cancel that
comes before the run's first step still ends it and closes the generation (which aborts the
engine's requests); each run counts as a request in flight until it ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from genserve.api.middleware import EdgeState
from genserve.api.responses_background import BackgroundResponses, Run, follow
from genserve.api.responses_events import StreamState
from genserve.api.responses_wire import Envelope, ResponsesRequest
from genserve.engine.types import FinishReason, TokenDelta
from genserve.runtime.generation import ChoiceDelta
from genserve.storage.db import open_database
from genserve.storage.responses import EVENTS_FLUSH_EVERY, ResponseStore, StoredResponse


class Generation:
    """Deltas as the test lets them go, one per `step()`; `closed` once it was left."""

    def __init__(self, words: int) -> None:
        self.words = words
        self.gate: asyncio.Queue[None] = asyncio.Queue()
        self.closed = False

    async def events(self) -> AsyncIterator[ChoiceDelta]:
        try:
            for n in range(1, self.words + 1):
                await self.gate.get()
                reason = FinishReason.LENGTH if n == self.words else None
                delta = TokenDelta("r-0", (n,), f"w{n} ", reason, 3, n)
                yield ChoiceDelta(0, delta.text, reason and reason.value, delta)
        finally:
            self.closed = True

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            self.gate.put_nowait(None)


def new_run(store: ResponseStore) -> Run:
    body = ResponsesRequest(model="m", input="x", background=True)
    st = StreamState(Envelope("resp_1", 1, "m", body))
    run = Run(st, store, 3, [], lambda tokens: None)
    store.put(StoredResponse("resp_1", "p", 1, run.snapshot(), [], []), run.begin())
    return run


async def test_a_cancel_before_its_first_step_still_ends_it(tmp_path: Path) -> None:
    store, edge = ResponseStore(open_database(tmp_path)), EdgeState(None, (), 1 << 20)
    runs, gen = BackgroundResponses(edge), Generation(5)
    run = new_run(store)
    runs.start(run, gen.events())
    assert edge.in_flight == 1
    await runs.cancel(run)  # its task has not run yet
    assert run.done and gen.closed and runs.live(run.id) is None and edge.in_flight == 0
    assert store.get("resp_1", "p").status == "cancelled"
    await runs.cancel(run)  # again: nothing left to do


async def test_followers_read_every_event_once_and_the_store_keeps_up(tmp_path: Path) -> None:
    store, edge = ResponseStore(open_database(tmp_path)), EdgeState(None, (), 1 << 20)
    runs, gen = BackgroundResponses(edge), Generation(2 * EVENTS_FLUSH_EVERY)
    run = new_run(store)
    runs.start(run, gen.events())
    early, late = [], []

    async def read(into: list, after: int) -> None:
        async for frame in follow(run, after):
            into.append(json.loads(frame["data"]))
            # Whatever a follower has read, the store holds all but the last batch of.
            stored = store.events_after(run.id, -1)
            assert into[-1]["sequence_number"] < len(stored) + EVENTS_FLUSH_EVERY

    readers = [asyncio.create_task(read(early, -1)), asyncio.create_task(read(late, 10))]
    gen.step(gen.words)
    await asyncio.gather(*readers)
    assert [e["sequence_number"] for e in early] == list(range(len(run.events)))
    assert late == early[11:]
    assert early[2]["type"] == "response.in_progress" and early[-1]["type"] == "response.incomplete"
    stored = store.events_after(run.id, -1)
    assert [json.loads(e.data) for e in stored] == early  # all of them, once it has ended
    final = store.get("resp_1", "p")
    assert final.status == "incomplete" and final.body["usage"]["output_tokens"] == gen.words
    assert edge.in_flight == 0
