"""Background responses under Ray without a cluster: a run on one engine replica forwards its
writes, in order, to the control replica's store (api/responses_background.py
ForwardedWrites); another replica streams its stored events until its stored status is final,
and a cancel asked through it is recorded in the store, seen by the running replica within
CANCEL_CHECK_S, and answered once the run's end is stored. All scoped to the caller's project."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from genserve.api import responses, responses_background
from genserve.api.middleware import EdgeState
from genserve.api.responses_background import BackgroundResponses, ForwardedWrites, Run
from genserve.api.responses_events import StreamState
from genserve.api.responses_wire import Envelope, ResponsesRequest
from genserve.ray.records import RemoteResponses, Stores
from genserve.storage.db import open_database
from genserve.storage.responses import EVENTS_FLUSH_EVERY, StoredResponse
from tests.unit.test_ray_records import FakeControl
from tests.unit.test_responses_background import Generation


@pytest.fixture
def control(tmp_path: Path) -> FakeControl:
    return FakeControl(Stores.over(open_database(tmp_path)))


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responses_background, "CANCEL_CHECK_S", 0.05)
    monkeypatch.setattr(responses, "POLL_S", 0.02)


async def started_run(control: FakeControl) -> tuple[Run, BackgroundResponses]:
    """A run as an engine replica starts it: stored `queued` in the control replica's store,
    its writes forwarded there."""
    records, edge = RemoteResponses(control), EdgeState(None, (), 1 << 20)
    runs = BackgroundResponses(edge)
    body = ResponsesRequest(model="m", input="x", background=True)
    writes = ForwardedWrites(records, "p", "resp_1", lambda: runs.cancel_id("resp_1"))
    run = Run(StreamState(Envelope("resp_1", 1, "m", body)), writes, 3, [], lambda _: None)
    run.settle = writes.settle
    await records.put(StoredResponse("resp_1", "p", 1, run.snapshot(), [], []), run.begin())
    return run, runs


def stored_events(control: FakeControl) -> list[dict]:
    return [json.loads(e.data) for e in control.stores.responses.events_after("resp_1", -1)]


async def test_a_runs_writes_reach_the_control_store_in_order(control: FakeControl) -> None:
    run, runs = await started_run(control)
    gen = Generation(70)  # past two flushes
    runs.start(run, gen.events())
    gen.step(gen.words)
    await asyncio.wait({run.task})  # type: ignore[arg-type]
    assert runs.live("resp_1") is None and runs.edge.in_flight == 0  # settled: all written
    events = stored_events(control)
    assert [e["sequence_number"] for e in events] == list(range(len(run.events)))
    assert events == [json.loads(f["data"]) for f in run.events]
    final = control.stores.responses.get("resp_1", "p")
    assert final is not None and final.status == "incomplete"
    assert final.body["usage"]["output_tokens"] == gen.words


async def test_another_replica_streams_the_stored_events_to_the_end(control: FakeControl) -> None:
    run, runs = await started_run(control)
    gen = Generation(40)
    runs.start(run, gen.events())
    other = RemoteResponses(control)  # a replica that does not run it
    got: list[dict] = []

    async def read() -> None:
        async for frame in responses.polled(other, "resp_1", "p", -1):
            got.append(json.loads(frame["data"]))

    reader = asyncio.create_task(read())
    for _ in range(gen.words):
        gen.step()
        await asyncio.sleep(0.001)
    await asyncio.wait_for(reader, 10)
    assert [e["sequence_number"] for e in got] == list(range(len(run.events)))
    assert got[-1]["type"] == "response.incomplete"
    tail: list[dict] = [  # resumed after a sequence number, once it has ended
        json.loads(f["data"]) async for f in responses.polled(other, "resp_1", "p", 30)
    ]
    assert tail == got[31:]
    assert [f async for f in responses.polled(other, "resp_1", "q", -1)] == []  # not theirs


async def test_a_cancel_asked_through_another_replica_stops_the_run(control: FakeControl) -> None:
    run, runs = await started_run(control)
    gen = Generation(1000)
    runs.start(run, gen.events())
    gen.step(3)
    other = RemoteResponses(control)
    await other.request_cancel("resp_1", "q")  # another project's caller: nothing recorded
    assert not control.stores.responses.cancel_requested("resp_1")
    found = await responses.cancel_elsewhere(other, "resp_1", "p")
    assert found.status == "cancelled" and gen.closed and run.done
    assert runs.live("resp_1") is None and runs.edge.in_flight == 0
    assert stored_events(control) == [json.loads(f["data"]) for f in run.events]


async def test_a_run_learns_of_a_cancel_as_it_writes(
    control: FakeControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its writes answer whether a cancel was asked: a fast run stops at its next flush,
    without waiting for the periodic check."""
    monkeypatch.setattr(responses_background, "CANCEL_CHECK_S", 100.0)
    run, runs = await started_run(control)
    gen = Generation(1000)
    runs.start(run, gen.events())
    gen.step(3)
    await asyncio.sleep(0.01)
    await RemoteResponses(control).request_cancel("resp_1", "p")
    assert not gen.closed
    gen.step(EVENTS_FLUSH_EVERY + 1)  # past its next flush
    await asyncio.wait_for(asyncio.wait({run.task}), 5)  # type: ignore[arg-type]
    found = control.stores.responses.get("resp_1", "p")
    assert found is not None and found.status == "cancelled" and gen.closed


async def test_a_run_deleted_meanwhile_writes_nothing_more(control: FakeControl) -> None:
    run, runs = await started_run(control)
    gen = Generation(70)
    runs.start(run, gen.events())
    gen.step(2)
    await asyncio.sleep(0.01)
    assert await RemoteResponses(control).delete("resp_1", "p")
    gen.step(gen.words)
    await asyncio.wait({run.task})  # type: ignore[arg-type]
    assert control.stores.responses.get("resp_1", "p") is None
    assert stored_events(control) == []  # its later events are not left behind


async def test_a_write_that_fails_does_not_stop_the_run(control: FakeControl) -> None:
    run, runs = await started_run(control)
    gen = Generation(40)
    runs.start(run, gen.events())
    control.down = True  # the control replica restarting: these writes are lost
    gen.step(35)
    await asyncio.sleep(0.05)
    control.down = False
    gen.step(gen.words - 35)
    await asyncio.wait({run.task})  # type: ignore[arg-type]
    final = control.stores.responses.get("resp_1", "p")
    assert run.done and final is not None and final.status == "incomplete"
