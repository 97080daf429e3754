"""Stored responses and chat completions under Ray without a cluster (genserve/ray/records.py):
an engine replica's handlers read and write the control replica's store through an awaited
handle; the control side answers a whitelist of operations per kind of call, each scoped to the
caller's project; a call that fails in transit is a 503 the client may retry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cloudpickle
import pytest

from genserve.api.errors import APIError
from genserve.api.responses import chain, records_of
from genserve.config import ServerConfig
from genserve.ray.records import (
    CompletionCall,
    RemoteCompletions,
    RemoteResponses,
    ResponseCall,
    StoreCall,
    Stores,
    answer,
)
from genserve.runtime.errors import Unavailable
from genserve.runtime.runtime import Runtime
from genserve.storage.completions import CompletionQuery, StoredCompletion
from genserve.storage.db import open_database
from genserve.storage.responses import StoredEvent, StoredResponse


class FakeControl:
    """The control replica's handle: store_call.remote(call), its argument and answer
    pickled as Ray would, answered on a thread as the control replica does."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.store = stores.responses
        self.store_call = self
        self.down = False

    async def remote(self, call: StoreCall) -> object:
        if self.down:
            raise ConnectionError("the control replica is restarting")
        sent = cloudpickle.loads(cloudpickle.dumps(call))
        got = await asyncio.to_thread(answer, self.stores, sent)
        return cloudpickle.loads(cloudpickle.dumps(got))


def row(response_id: str, project: str = "p", status: str = "completed") -> StoredResponse:
    body = {"id": response_id, "object": "response", "status": status, "output": []}
    items = [{"id": "msg_1", "type": "message", "role": "user", "content": "hi"}]
    return StoredResponse(response_id, project, 1, body, items, [*items, {"id": "out"}])


@pytest.fixture
def control(tmp_path: Path) -> FakeControl:
    return FakeControl(Stores.over(open_database(tmp_path)))


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
    store = control.stores
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
    assert store.responses.get("resp_x", "q") is None


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


# --- stored chat completions -----------------------------------------------------------------


def completion(completion_id: str, project: str = "p", model: str = "m", **metadata: str):  # noqa: ANN201
    body = {"id": completion_id, "object": "chat.completion", "model": model, "metadata": metadata}
    messages = [{"id": f"{completion_id}-0", "role": "user", "content": "hi"}]
    return StoredCompletion(completion_id, project, 1, model, body, messages)


async def test_completions_stored_through_either_replica_are_listed_by_both(
    control: FakeControl,
) -> None:
    one, other = RemoteCompletions(control), RemoteCompletions(control)
    await one.put(completion("c1", topic="math"))
    await other.put(completion("c2", topic="poetry"))
    await one.put(completion("c3", model="n", topic="math"))
    for records in (one, other):
        page, more = await records.list(CompletionQuery("p"))
        assert [c.id for c in page] == ["c1", "c2", "c3"] and not more
    page, _ = await other.list(CompletionQuery("p", metadata=(("topic", "math"),), limit=1))
    assert [c.id for c in page] == ["c1"]
    page, _ = await one.list(CompletionQuery("p", model="n"))
    assert [c.id for c in page] == ["c3"]
    assert await other.set_metadata("c1", "p", {"topic": "algebra"})
    got = await one.get("c1", "p")
    assert got is not None and got.body["metadata"] == {"topic": "algebra"}
    assert got.messages == completion("c1").messages
    assert await one.delete("c1", "p")
    assert await other.get("c1", "p") is None
    assert not await other.delete("c1", "p")


async def test_another_projects_caller_cannot_reach_a_completion(control: FakeControl) -> None:
    records = RemoteCompletions(control)
    await records.put(completion("c1", topic="math"))
    assert await records.get("c1", "q") is None
    assert await records.list(CompletionQuery("q")) == ([], False)
    assert not await records.set_metadata("c1", "q", {"topic": "stolen"})
    assert not await records.delete("c1", "q")
    kept = await records.get("c1", "p")
    assert kept is not None and kept.body["metadata"] == {"topic": "math"}


def test_the_control_side_answers_only_whitelisted_completion_calls(
    control: FakeControl,
) -> None:
    stores = control.stores
    for op in ("_stored", "_cursor", "__init__", "fail_unfinished"):
        with pytest.raises(ValueError):
            answer(stores, CompletionCall(op, "p"))
    with pytest.raises(ValueError):  # a row under another project than the caller's
        answer(stores, CompletionCall("put", "p", "c1", row=completion("c1", project="q")))
    with pytest.raises(ValueError):  # a listing of another project's
        answer(stores, CompletionCall("list", "p", query=CompletionQuery("q")))
    with pytest.raises(ValueError):
        answer(stores, CompletionCall("set_metadata", "p", "c1"))  # no metadata
    with pytest.raises(TypeError):
        answer(stores, ("put", "p"))  # type: ignore[arg-type]
    assert stores.completions.get("c1", "q") is None


async def test_a_chat_completion_is_saved_and_read_through_the_remote_records(
    control: FakeControl,
) -> None:
    """The handlers' path: a runtime given remote records stores a chat completion there (and
    never in a store of its own: it has no database)."""
    from genserve.api import stored_completions as stored
    from genserve.api.schemas import ChatCompletionRequest

    rt = Runtime(ServerConfig(), ready=True, completions=RemoteCompletions(control))
    assert stored.records_of(rt) is rt.completions
    body = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], store=True, metadata={"k": "v"}
    )
    obj = {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m"}
    await stored.save(rt, "p", body, obj)
    got = control.stores.completions.get("chatcmpl-1", "p")
    assert got is not None and got.body["metadata"] == {"k": "v"}
    assert [m["content"] for m in got.messages] == ["hi"]
