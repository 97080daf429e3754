"""Stored responses under Ray without a cluster (genserve/ray/records.py): an engine replica's
handlers read and write the control replica's store through an awaited handle; the control
side answers a whitelist of operations, each scoped to the caller's project; a call that
fails in transit is a 503 the client may retry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cloudpickle
import pytest

from genserve.api.errors import APIError
from genserve.api.responses import chain, records_of
from genserve.config import ServerConfig
from genserve.ray.records import RemoteResponses, ResponseCall, answer
from genserve.runtime.errors import Unavailable
from genserve.runtime.runtime import Runtime
from genserve.storage.db import open_database
from genserve.storage.responses import ResponseStore, StoredEvent, StoredResponse


class FakeControl:
    """The control replica's handle: response_call.remote(call), its argument and answer
    pickled as Ray would, answered on a thread as the control replica does."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self.response_call = self
        self.down = False

    async def remote(self, call: ResponseCall) -> object:
        if self.down:
            raise ConnectionError("the control replica is restarting")
        sent = cloudpickle.loads(cloudpickle.dumps(call))
        got = await asyncio.to_thread(answer, self.store, sent)
        return cloudpickle.loads(cloudpickle.dumps(got))


def row(response_id: str, project: str = "p", status: str = "completed") -> StoredResponse:
    body = {"id": response_id, "object": "response", "status": status, "output": []}
    items = [{"id": "msg_1", "type": "message", "role": "user", "content": "hi"}]
    return StoredResponse(response_id, project, 1, body, items, [*items, {"id": "out"}])


@pytest.fixture
def control(tmp_path: Path) -> FakeControl:
    return FakeControl(ResponseStore(open_database(tmp_path)))


async def test_a_response_put_by_one_replica_is_read_and_deleted_by_another(
    control: FakeControl,
) -> None:
    one, other = RemoteResponses(control), RemoteResponses(control)
    await one.put(row("resp_1"))
    got = await other.get("resp_1", "p")
    assert got == row("resp_1")
    assert await other.delete("resp_1", "p")
    assert await one.get("resp_1", "p") is None
    assert not await one.delete("resp_1", "p")


async def test_another_projects_caller_cannot_reach_a_response(control: FakeControl) -> None:
    records = RemoteResponses(control)
    await records.put(row("resp_1"), [StoredEvent(0, "response.created", "{}")])
    assert await records.get("resp_1", "q") is None
    assert await records.events_after("resp_1", "q", -1) == []
    await records.update("resp_1", "q", {"status": "cancelled"})
    assert not await records.delete("resp_1", "q")
    kept = await records.get("resp_1", "p")
    assert kept is not None and kept.status == "completed"  # the update did not touch it
    assert [e.seq for e in await records.events_after("resp_1", "p", -1)] == [0]


def test_the_control_side_answers_only_whitelisted_scoped_calls(control: FakeControl) -> None:
    store = control.store
    with pytest.raises(ValueError):
        answer(store, ResponseCall("fail_unfinished", "p"))  # a store method, not an operation
    with pytest.raises(ValueError):
        answer(store, ResponseCall("__class__", "p"))
    with pytest.raises(TypeError):
        answer(store, {"op": "get", "project": "p"})  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # a row under another project than the caller's
        answer(store, ResponseCall("put", "p", "resp_x", row=row("resp_x", project="q")))
    with pytest.raises(ValueError):
        answer(store, ResponseCall("update", "p", "resp_x", body={"no": "status"}))
    assert store.get("resp_x", "q") is None


async def test_a_control_replica_that_does_not_answer_is_a_503(control: FakeControl) -> None:
    control.down = True
    with pytest.raises(Unavailable):
        await RemoteResponses(control).get("resp_1", "p")


async def test_a_chain_continues_from_the_control_replicas_store(control: FakeControl) -> None:
    """The handlers' path: a runtime given remote records reads the chain through them (and
    never opens a store of its own: it has no database)."""
    rt = Runtime(ServerConfig(), ready=True, responses=RemoteResponses(control))
    assert records_of(rt) is rt.responses
    await rt.responses.put(row("resp_1"))
    assert await chain(rt, "p", "resp_1") == row("resp_1").context
    with pytest.raises(APIError) as e:  # another project's chain: not found
        await chain(rt, "q", "resp_1")
    assert e.value.status == 404 and e.value.param == "previous_response_id"
    await rt.responses.put(row("resp_2", status="in_progress"))
    with pytest.raises(APIError) as e:
        await chain(rt, "p", "resp_2")
    assert e.value.status == 400
