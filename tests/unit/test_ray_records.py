"""Stored responses, chat completions and conversations under Ray without a cluster
(genserve/ray/records.py):
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
    ConversationCall,
    RemoteCompletions,
    RemoteConversations,
    RemoteResponses,
    ResponseCall,
    StoreCall,
    Stores,
    answer,
)
from genserve.runtime.errors import Unavailable
from genserve.runtime.runtime import Runtime
from genserve.storage.completions import CompletionQuery, StoredCompletion
from genserve.storage.conversations import ItemPage, StoredConversation
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
    assert not await records.update("resp_1", "q", {"status": "cancelled"})
    assert not await records.add_events("resp_1", "q", [StoredEvent(1, "planted", "{}")])
    await records.request_cancel("resp_1", "q")
    assert not await records.cancel_requested("resp_1", "q")
    assert not await records.cancel_requested("resp_1", "p")  # nothing was recorded
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


# --- conversations ---------------------------------------------------------------------------


def msg(item_id: str) -> dict:
    return {"id": item_id, "type": "message", "role": "user", "content": [], "status": "completed"}


def item_ids(items: list[dict]) -> list[str]:
    return [i["id"] for i in items]


async def test_a_conversation_is_shared_by_every_replica(control: FakeControl) -> None:
    one, other = RemoteConversations(control), RemoteConversations(control)
    await one.create(StoredConversation("conv_1", "p", 1, {"k": "v"}), [msg("m0")])
    assert await other.get("conv_1", "p") == StoredConversation("conv_1", "p", 1, {"k": "v"})
    assert await other.append("conv_1", "p", [msg("m1"), msg("m2")])
    assert await one.append("conv_1", "p", [msg("m3")])
    assert item_ids(await other.items("conv_1", "p")) == ["m0", "m1", "m2", "m3"]
    assert await one.taken("conv_1", "p", ["m2", "mx"]) == ["m2"]
    page = await other.page("conv_1", "p", "m0", 2, False)
    assert page is not None and item_ids(page.items) == ["m1", "m2"] and page.has_more
    page = await one.page("conv_1", "p", None, 10, True)
    assert page is not None and item_ids(page.items) == ["m3", "m2", "m1", "m0"]
    assert await one.page("conv_1", "p", "nope", 10, True) is None
    assert (await other.item("conv_1", "p", "m1")) == msg("m1")
    assert await one.delete_item("conv_1", "p", "m1")
    assert await other.item("conv_1", "p", "m1") is None
    assert await other.set_metadata("conv_1", "p", {"k": "w"})
    assert (await one.get("conv_1", "p")).metadata == {"k": "w"}  # type: ignore[union-attr]
    assert await one.delete("conv_1", "p")
    assert await other.get("conv_1", "p") is None
    assert not await other.append("conv_1", "p", [msg("m4")])  # deleted while one ran


async def test_another_projects_caller_cannot_reach_a_conversation(control: FakeControl) -> None:
    records = RemoteConversations(control)
    await records.create(StoredConversation("conv_1", "p", 1, {"k": "v"}), [msg("m0")])
    assert await records.get("conv_1", "q") is None
    assert await records.items("conv_1", "q") == []
    assert await records.taken("conv_1", "q", ["m0"]) == []
    assert await records.page("conv_1", "q", None, 10, False) == ItemPage([], False)
    assert await records.item("conv_1", "q", "m0") is None
    assert not await records.delete_item("conv_1", "q", "m0")
    assert not await records.append("conv_1", "q", [msg("planted")])
    assert not await records.set_metadata("conv_1", "q", {"k": "stolen"})
    assert not await records.delete("conv_1", "q")
    kept = await records.get("conv_1", "p")
    assert kept is not None and kept.metadata == {"k": "v"}
    assert item_ids(await records.items("conv_1", "p")) == ["m0"]


def test_the_control_side_answers_only_whitelisted_conversation_calls(
    control: FakeControl,
) -> None:
    stores = control.stores
    for op in ("_cursor", "__init__", "db", "get_item"):
        with pytest.raises(ValueError):
            answer(stores, ConversationCall(op, "p"))
    theirs = StoredConversation("conv_x", "q", 1, {})
    with pytest.raises(ValueError):  # a conversation under another project than the caller's
        answer(stores, ConversationCall("create", "p", "conv_x", theirs))
    with pytest.raises(ValueError):
        answer(stores, ConversationCall("set_metadata", "p", "conv_x"))  # no metadata
    assert stores.conversations.get("conv_x", "q") is None


async def test_a_response_in_a_conversation_reads_and_joins_the_control_replicas_store(
    control: FakeControl,
) -> None:
    """The handlers' path: a runtime given remote records reads a conversation's items as a
    response's context, and appends its turn there."""
    from genserve.api.conversations import context_of, join, records_of

    rt = Runtime(ServerConfig(), ready=True, conversations=RemoteConversations(control))
    assert records_of(rt) is rt.conversations
    await rt.conversations.create(StoredConversation("conv_1", "p", 1, {}), [msg("m0")])
    assert item_ids(await context_of(rt, "p", "conv_1", [msg("m1")])) == ["m0"]
    with pytest.raises(APIError) as e:  # an input item the conversation has: 400
        await context_of(rt, "p", "conv_1", [msg("m0")])
    assert e.value.status == 400
    with pytest.raises(APIError) as e:  # another project's: not found
        await context_of(rt, "q", "conv_1", [])
    assert e.value.status == 404 and e.value.param == "conversation"
    await join(rt, "p", "conv_1", [msg("m1"), msg("out")])
    assert item_ids(control.stores.conversations.items("conv_1")) == ["m0", "m1", "out"]
