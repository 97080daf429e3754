"""What the API stores for callers under Ray: kept in the control replica's store, whichever
engine replica answers. Each engine replica runs the whole app with a scratch store of its own;
a response, a stored chat completion or a conversation kept there would be found by one replica
in N. So an engine replica's handlers use `RemoteResponses`, `RemoteCompletions` and
`RemoteConversations` (the awaited records interfaces of genserve.storage.responses,
.completions and .conversations), which await the control replica's `store_call` through its
Serve handle: the replica's event loop never blocks on the round trip.

The control replica answers a call with `answer`: one dispatch over a whitelist of operations
per kind of call, each scoped to the caller's project as on one node (a row of another project
reads as missing, and cannot be written, updated or deleted; a conversation of another project
has no items). A call is a typed dataclass (`ResponseCall`, `CompletionCall`,
`ConversationCall`) naming its operation and carrying only what that operation needs.
A background response runs on the engine replica that started it and writes its state and
events here as it goes; a cancel asked through another replica is recorded here
(`request_cancel`) and read by the running one (`cancel_requested`).

No Ray import here: the control replica's handle is passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from genserve.runtime.errors import Unavailable
from genserve.storage.completions import CompletionQuery, CompletionStore, StoredCompletion
from genserve.storage.conversations import ConversationStore, ItemPage, StoredConversation
from genserve.storage.db import Database
from genserve.storage.responses import ResponseStore, StoredEvent, StoredResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stores:
    """The control replica's stores, over its one database."""

    responses: ResponseStore
    completions: CompletionStore
    conversations: ConversationStore

    @classmethod
    def over(cls, db: Database) -> Stores:
        return cls(ResponseStore(db), CompletionStore(db), ConversationStore(db))


# --- the calls -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseCall:
    """One operation on the control replica's stored responses, as an engine replica asks."""

    op: str  # one of RESPONSE_OPS
    project: str  # the caller's, as the engine replica authenticated it
    response_id: str = ""
    row: StoredResponse | None = None  # put
    events: tuple[StoredEvent, ...] = ()  # put, update, add_events
    body: dict | None = None  # update
    context: list[dict] | None = None  # update, once a background response has ended
    after: int = -1  # events_after


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """One operation on the control replica's stored chat completions."""

    op: str  # one of COMPLETION_OPS
    project: str
    completion_id: str = ""
    row: StoredCompletion | None = None  # put
    query: CompletionQuery | None = None  # list
    metadata: dict[str, str] | None = None  # set_metadata


@dataclass(frozen=True, slots=True)
class ConversationCall:
    """One operation on the control replica's conversations and their items."""

    op: str  # one of CONVERSATION_OPS
    project: str
    conversation_id: str = ""
    conversation: StoredConversation | None = None  # create
    items: tuple[dict, ...] = ()  # create, append
    ids: tuple[str, ...] = ()  # taken
    item_id: str = ""  # item, delete_item
    metadata: dict[str, str] | None = None  # set_metadata
    after: str | None = None  # page
    limit: int = 20  # page
    descending: bool = False  # page


StoreCall = ResponseCall | CompletionCall | ConversationCall


def _mine(project: str, owner: str, what: str) -> None:
    """A row is written under its caller's project only (an engine replica's bug, or a forged
    call, must not plant one in another project)."""
    if owner != project:
        raise ValueError(f"a {what} is written under its caller's project only")


def _metadata(call: CompletionCall | ConversationCall) -> dict[str, str]:
    if not isinstance(call.metadata, dict):
        raise ValueError("set_metadata carries the metadata")
    return call.metadata


# --- stored responses ------------------------------------------------------------------------


def _response_put(store: ResponseStore, call: ResponseCall) -> None:
    if call.row is None:
        raise ValueError("put carries the response")
    _mine(call.project, call.row.project, "stored response")
    store.put(call.row, call.events)


def _response_owned(store: ResponseStore, call: ResponseCall) -> bool:
    """Whether the caller's project has the response (another project's reads as missing; a
    deleted one takes no more writes from the run that still ends it)."""
    return store.get(call.response_id, call.project) is not None


def _response_update(store: ResponseStore, call: ResponseCall) -> bool:
    """Whether a cancel of it was asked: a running background response learns it as it
    writes (False when it is not the caller's, or was deleted)."""
    if call.body is None or not isinstance(call.body.get("status"), str):
        raise ValueError("an update carries the response's body, with its status")
    if not _response_owned(store, call):
        return False
    store.update(call.response_id, call.body, call.context, call.events)
    return store.cancel_requested(call.response_id)


def _response_add_events(store: ResponseStore, call: ResponseCall) -> bool:
    """As `_response_update`: whether a cancel of it was asked."""
    if not _response_owned(store, call):
        return False
    store.add_events(call.response_id, call.events)
    return store.cancel_requested(call.response_id)


def _response_events(store: ResponseStore, call: ResponseCall) -> list[StoredEvent]:
    if not _response_owned(store, call):
        return []
    return store.events_after(call.response_id, call.after)


def _request_cancel(store: ResponseStore, call: ResponseCall) -> bool:
    if not _response_owned(store, call):
        return False
    store.request_cancel(call.response_id)
    return True


def _cancel_requested(store: ResponseStore, call: ResponseCall) -> bool:
    return _response_owned(store, call) and store.cancel_requested(call.response_id)


RESPONSE_OPS: dict[str, Callable[[ResponseStore, ResponseCall], Any]] = {
    "get": lambda store, call: store.get(call.response_id, call.project),
    "put": _response_put,
    "update": _response_update,
    "add_events": _response_add_events,
    "delete": lambda store, call: store.delete(call.response_id, call.project),
    "events_after": _response_events,
    "request_cancel": _request_cancel,
    "cancel_requested": _cancel_requested,
}


# --- stored chat completions -----------------------------------------------------------------


def _completion_put(store: CompletionStore, call: CompletionCall) -> None:
    if call.row is None:
        raise ValueError("put carries the completion")
    _mine(call.project, call.row.project, "stored completion")
    store.put(call.row)


def _completion_list(
    store: CompletionStore, call: CompletionCall
) -> tuple[list[StoredCompletion], bool]:
    if call.query is None:
        raise ValueError("list carries its query")
    _mine(call.project, call.query.project, "listing")  # a listing is of the caller's only
    return store.list(call.query)


COMPLETION_OPS: dict[str, Callable[[CompletionStore, CompletionCall], Any]] = {
    "put": _completion_put,
    "get": lambda store, call: store.get(call.completion_id, call.project),
    "list": _completion_list,
    "set_metadata": lambda store, call: store.set_metadata(
        call.completion_id, call.project, _metadata(call)
    ),
    "delete": lambda store, call: store.delete(call.completion_id, call.project),
}


# --- conversations ---------------------------------------------------------------------------


def _conversation_create(store: ConversationStore, call: ConversationCall) -> None:
    if call.conversation is None:
        raise ValueError("create carries the conversation")
    _mine(call.project, call.conversation.project, "conversation")
    store.create(call.conversation, call.items)


def _owned(store: ConversationStore, call: ConversationCall) -> bool:
    """Whether the caller's project has the conversation: its items are scoped through it."""
    return store.get(call.conversation_id, call.project) is not None


def _items(store: ConversationStore, call: ConversationCall) -> list[dict]:
    return store.items(call.conversation_id) if _owned(store, call) else []


def _taken(store: ConversationStore, call: ConversationCall) -> list[str]:
    return store.taken(call.conversation_id, call.ids) if _owned(store, call) else []


def _page(store: ConversationStore, call: ConversationCall) -> ItemPage | None:
    if not _owned(store, call):
        return ItemPage([], False)
    return store.page(call.conversation_id, call.after, call.limit, call.descending)


def _item(store: ConversationStore, call: ConversationCall) -> dict | None:
    return store.item(call.conversation_id, call.item_id) if _owned(store, call) else None


def _delete_item(store: ConversationStore, call: ConversationCall) -> bool:
    return _owned(store, call) and store.delete_item(call.conversation_id, call.item_id)


CONVERSATION_OPS: dict[str, Callable[[ConversationStore, ConversationCall], Any]] = {
    "create": _conversation_create,
    "get": lambda store, call: store.get(call.conversation_id, call.project),
    "set_metadata": lambda store, call: store.set_metadata(
        call.conversation_id, call.project, _metadata(call)
    ),
    "delete": lambda store, call: store.delete(call.conversation_id, call.project),
    "append": lambda store, call: store.append(call.conversation_id, call.project, call.items),
    "items": _items,
    "taken": _taken,
    "page": _page,
    "item": _item,
    "delete_item": _delete_item,
}


# --- the control replica's side --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of call: what it is called in errors, its store, its operations."""

    name: str
    store: Callable[[Stores], Any]
    ops: dict[str, Callable[[Any, Any], Any]]


KINDS: dict[type, Kind] = {
    ResponseCall: Kind("stored-response", attrgetter("responses"), RESPONSE_OPS),
    CompletionCall: Kind("stored-completion", attrgetter("completions"), COMPLETION_OPS),
    ConversationCall: Kind("conversation", attrgetter("conversations"), CONVERSATION_OPS),
}


def answer(stores: Stores, call: StoreCall) -> Any:  # noqa: ANN401 - per operation
    """On the control replica: one whitelisted operation, scoped to the call's project."""
    kind = KINDS.get(type(call))
    if kind is None:
        raise TypeError(f"not a store call: {type(call).__name__}")
    op = kind.ops.get(call.op)
    if op is None:
        raise ValueError(f"unknown {kind.name} operation {call.op!r}")
    return op(kind.store(stores), call)


# --- an engine replica's side ----------------------------------------------------------------


class Remote:
    """Calls on the control replica's store, awaited through its Serve handle."""

    what = "storage"  # in the 503's message

    def __init__(self, control: Any) -> None:  # noqa: ANN401 - a Serve deployment handle
        self.control = control

    async def _call(self, call: StoreCall) -> Any:  # noqa: ANN401 - per operation
        try:
            return await self.control.store_call.remote(call)
        except Exception as e:
            # The control replica restarting, or its store failing: retrying may succeed.
            log.warning("%s: %s on the control replica failed: %s", self.what, call.op, e)
            raise Unavailable(f"{self.what} is unavailable: the control replica did not "
                              "answer; retry") from e  # fmt: skip


class RemoteResponses(Remote):
    """An engine replica's ResponseRecords."""

    what = "response storage"

    async def get(self, response_id: str, project: str) -> StoredResponse | None:
        return await self._call(ResponseCall("get", project, response_id))

    async def put(self, r: StoredResponse, events: Sequence[StoredEvent] = ()) -> None:
        await self._call(ResponseCall("put", r.project, r.id, row=r, events=tuple(events)))

    async def update(
        self,
        response_id: str,
        project: str,
        body: dict,
        context: list[dict] | None = None,
        events: Sequence[StoredEvent] = (),
    ) -> bool:
        call = ResponseCall(
            "update", project, response_id, events=tuple(events), body=body, context=context
        )
        return await self._call(call)

    async def add_events(
        self, response_id: str, project: str, events: Sequence[StoredEvent]
    ) -> bool:
        call = ResponseCall("add_events", project, response_id, events=tuple(events))
        return await self._call(call)

    async def delete(self, response_id: str, project: str) -> bool:
        return await self._call(ResponseCall("delete", project, response_id))

    async def events_after(self, response_id: str, project: str, seq: int) -> list[StoredEvent]:
        return await self._call(ResponseCall("events_after", project, response_id, after=seq))

    async def request_cancel(self, response_id: str, project: str) -> None:
        await self._call(ResponseCall("request_cancel", project, response_id))

    async def cancel_requested(self, response_id: str, project: str) -> bool:
        return await self._call(ResponseCall("cancel_requested", project, response_id))


class RemoteCompletions(Remote):
    """An engine replica's CompletionRecords."""

    what = "completion storage"

    async def put(self, c: StoredCompletion) -> None:
        await self._call(CompletionCall("put", c.project, c.id, row=c))

    async def get(self, completion_id: str, project: str) -> StoredCompletion | None:
        return await self._call(CompletionCall("get", project, completion_id))

    async def list(self, q: CompletionQuery) -> tuple[list[StoredCompletion], bool]:
        return await self._call(CompletionCall("list", q.project, query=q))

    async def set_metadata(
        self, completion_id: str, project: str, metadata: dict[str, str]
    ) -> bool:
        call = CompletionCall("set_metadata", project, completion_id, metadata=metadata)
        return await self._call(call)

    async def delete(self, completion_id: str, project: str) -> bool:
        return await self._call(CompletionCall("delete", project, completion_id))


class RemoteConversations(Remote):
    """An engine replica's ConversationRecords."""

    what = "conversation storage"

    async def create(self, c: StoredConversation, items: Sequence[dict]) -> None:
        await self._call(ConversationCall("create", c.project, c.id, c, tuple(items)))

    async def get(self, conversation_id: str, project: str) -> StoredConversation | None:
        return await self._call(ConversationCall("get", project, conversation_id))

    async def set_metadata(
        self, conversation_id: str, project: str, metadata: dict[str, str]
    ) -> bool:
        call = ConversationCall("set_metadata", project, conversation_id, metadata=metadata)
        return await self._call(call)

    async def delete(self, conversation_id: str, project: str) -> bool:
        return await self._call(ConversationCall("delete", project, conversation_id))

    async def append(self, conversation_id: str, project: str, items: Sequence[dict]) -> bool:
        call = ConversationCall("append", project, conversation_id, items=tuple(items))
        return await self._call(call)

    async def items(self, conversation_id: str, project: str) -> list[dict]:
        return await self._call(ConversationCall("items", project, conversation_id))

    async def taken(self, conversation_id: str, project: str, ids: Sequence[str]) -> list[str]:
        return await self._call(ConversationCall("taken", project, conversation_id, ids=tuple(ids)))

    async def page(
        self, conversation_id: str, project: str, after: str | None, limit: int, descending: bool
    ) -> ItemPage | None:
        call = ConversationCall(
            "page", project, conversation_id, after=after, limit=limit, descending=descending
        )
        return await self._call(call)

    async def item(self, conversation_id: str, project: str, item_id: str) -> dict | None:
        return await self._call(ConversationCall("item", project, conversation_id, item_id=item_id))

    async def delete_item(self, conversation_id: str, project: str, item_id: str) -> bool:
        call = ConversationCall("delete_item", project, conversation_id, item_id=item_id)
        return await self._call(call)
