"""/v1/conversations: OpenAI's Conversations API. A conversation is a list of items kept on the
server (storage/conversations.py), per project: created with up to 20 items and metadata, read,
relabelled, deleted (with its items; the responses run in it stay); its items added (up to 20 a
call), listed, read and deleted by id. Another project's key gets 404, as for a missing id.

`conversation` on /v1/responses (api/responses.py) runs a response with the conversation's items
before its input (`context_of`) and, once the response has ended, appends its input and output
(`join`). Items are checked by the rules of a response's input (responses_wire.input_items),
with its 400s, naming `items`. The handlers reach the store through an awaited
`ConversationRecords` (`records_of`): this process's store, or under Ray the control replica's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from genserve.api.auth import principal
from genserve.api.errors import APIError, bad_request
from genserve.api.models import runtime_of
from genserve.api.pages import listing
from genserve.api.responses_wire import INCLUDABLE, LOGPROBS, input_items, new_id
from genserve.api.schemas import Metadata, WireModel
from genserve.runtime.errors import Unavailable
from genserve.runtime.runtime import Runtime
from genserve.storage.conversations import (
    ConversationRecords,
    ConversationStore,
    LocalConversations,
    StoredConversation,
)

log = logging.getLogger(__name__)
router = APIRouter()
MAX_ITEMS = 20  # OpenAI's limit of items a call adds
INCLUDE = (*INCLUDABLE, "web_search_call.results")  # OpenAI's IncludeEnum
DUPLICATE = "Duplicate item found with id {}. Remove duplicate items from your input and try again."


def not_found(conversation_id: str, param: str = "conversation_id") -> APIError:
    msg = f"Conversation with id '{conversation_id}' not found."
    return APIError(404, msg, param, "not_found")


def records_of(rt: Runtime) -> ConversationRecords:
    """Where conversations are read and written: this process's store, or the one the runtime
    was given (a Ray engine replica's: the control replica's, genserve/ray/records.py)."""
    rt.require_ready()
    if rt.conversations is not None:
        return rt.conversations
    if rt.database is None:
        raise Unavailable("conversation storage is unavailable: the database did not open")
    return LocalConversations(ConversationStore(rt.database))


def unique(items: Sequence[dict], taken: Collection[str], param: str) -> None:
    """400 (OpenAI's) for an item whose id the conversation or an earlier item has: items are
    read and deleted by id."""
    seen = set(taken)
    for item in items:
        if item["id"] in seen:
            raise bad_request(DUPLICATE.format(item["id"]), param)
        seen.add(item["id"])


# --- a response in a conversation ------------------------------------------------------------
async def context_of(
    rt: Runtime, project: str, conversation_id: str, items: Sequence[dict]
) -> list[dict]:
    """What a response in the conversation sees before its input: every item, oldest first.
    404 for a conversation the project does not have; 400 for an input item whose id the
    conversation has (appending it would make two)."""
    records = records_of(rt)
    if await records.get(conversation_id, project) is None:
        raise not_found(conversation_id, "conversation")
    context = await records.items(conversation_id, project)
    unique(items, [item["id"] for item in context], "input")
    return context


async def join(rt: Runtime, project: str, conversation_id: str, items: Sequence[dict]) -> None:
    """A response's input and output, appended once it has ended with an output (completed or
    incomplete); nothing when the conversation was deleted meanwhile."""
    if rt.conversations is None and rt.database is None:  # answered anyway, as unstored
        log.warning("conversation %s: turn not kept, the database did not open", conversation_id)
        return
    joined(await records_of(rt).append(conversation_id, project, items), conversation_id)


def join_here(
    store: ConversationStore, project: str, conversation_id: str, items: Sequence[dict]
) -> None:
    """`join` for a background response's run, whose end is stored synchronously in this
    process's store (background responses run on one node only)."""
    joined(store.append(conversation_id, project, items), conversation_id)


def joined(appended: bool, conversation_id: str) -> None:
    if not appended:
        log.info("conversation %s was deleted while a response ran in it", conversation_id)


# --- the routes ------------------------------------------------------------------------------
class CreateBody(WireModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None = None
    items: Annotated[list[dict[str, Any]], Field(max_length=MAX_ITEMS)] | None = None


class UpdateBody(WireModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None


class ItemsBody(WireModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[dict[str, Any]], Field(max_length=MAX_ITEMS)]


def wants_logprobs(request: Request) -> bool:
    """Whether `include` asks for output text logprobs (the one value that applies here); 400
    for a value OpenAI does not know. The openai client sends it as `include[]`."""
    query = request.query_params
    values = query.getlist("include") + query.getlist("include[]")
    for value in values:
        if value not in INCLUDE:
            raise bad_request(f"include: unknown value {value!r}", "include")
    return LOGPROBS in values


def shown(item: dict, logprobs: bool) -> dict:
    """An item as answered: its output text's logprobs (kept when its response asked for them)
    only when `include` asks for them, as OpenAI's."""
    if logprobs or item.get("type") != "message":
        return item
    parts = [
        {**p, "logprobs": []} if p.get("type") == "output_text" else p for p in item["content"]
    ]
    return {**item, "content": parts}


async def found(
    request: Request, conversation_id: str
) -> tuple[ConversationRecords, StoredConversation]:
    records = records_of(runtime_of(request))
    conversation = await records.get(conversation_id, principal(request).project)
    if conversation is None:
        raise not_found(conversation_id)
    return records, conversation


@router.post("/v1/conversations")
async def create_conversation(body: CreateBody, request: Request) -> JSONResponse:
    items = input_items(body.items, "items") if body.items else []
    unique(items, (), "items")
    project = principal(request).project
    made = StoredConversation(new_id("conv"), project, int(time.time()), body.metadata or {})
    await records_of(runtime_of(request)).create(made, items)
    return JSONResponse(made.body())


@router.get("/v1/conversations/{conversation_id}")
async def retrieve_conversation(conversation_id: str, request: Request) -> JSONResponse:
    return JSONResponse((await found(request, conversation_id))[1].body())


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str, body: UpdateBody, request: Request
) -> JSONResponse:
    """Only the metadata changes (OpenAI's rule): replaced whole; null clears it."""
    records, conversation = await found(request, conversation_id)
    metadata = body.metadata or {}
    if not await records.set_metadata(conversation_id, conversation.project, metadata):
        raise not_found(conversation_id)  # deleted meanwhile
    return JSONResponse(dataclasses.replace(conversation, metadata=metadata).body())


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request) -> JSONResponse:
    """The conversation and its items; the responses run in it stay."""
    records, conversation = await found(request, conversation_id)
    if not await records.delete(conversation_id, conversation.project):
        raise not_found(conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@router.post("/v1/conversations/{conversation_id}/items")
async def add_items(conversation_id: str, body: ItemsBody, request: Request) -> JSONResponse:
    logprobs = wants_logprobs(request)
    records, conversation = await found(request, conversation_id)
    project = conversation.project
    items = input_items(body.items, "items")
    taken = await records.taken(conversation_id, project, [item["id"] for item in items])
    unique(items, taken, "items")
    if not await records.append(conversation_id, project, items):
        raise not_found(conversation_id)  # deleted meanwhile
    return JSONResponse(listing([shown(item, logprobs) for item in items], False))


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(
    conversation_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    logprobs = wants_logprobs(request)
    records, conversation = await found(request, conversation_id)
    page = await records.page(conversation_id, conversation.project, after, limit, order == "desc")
    if page is None:
        raise bad_request(f"no item `{after}` in this conversation", "after")
    return JSONResponse(listing([shown(item, logprobs) for item in page.items], page.has_more))


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def retrieve_item(conversation_id: str, item_id: str, request: Request) -> JSONResponse:
    logprobs = wants_logprobs(request)
    records, conversation = await found(request, conversation_id)
    item = await records.item(conversation_id, conversation.project, item_id)
    if item is None:
        raise item_not_found(item_id)
    return JSONResponse(shown(item, logprobs))


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, request: Request) -> JSONResponse:
    """Answers the conversation, as OpenAI's does."""
    records, conversation = await found(request, conversation_id)
    if not await records.delete_item(conversation_id, conversation.project, item_id):
        raise item_not_found(item_id)
    return JSONResponse(conversation.body())


def item_not_found(item_id: str) -> APIError:
    return APIError(404, f"Item with id '{item_id}' not found.", "item_id", "not_found")
