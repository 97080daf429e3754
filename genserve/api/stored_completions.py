"""Stored chat completions: `store: true` on POST /v1/chat/completions keeps the answer (streamed
or not) with its request's messages; GET /v1/chat/completions lists them (by model and
metadata), and GET, POST (metadata), DELETE /v1/chat/completions/{id} and GET .../messages
read, label and remove one, as OpenAI's routes do. Per project: another project's key gets 404.

What they are for here: the answers a served model gave, labelled with metadata, to be read
back as data, e.g. a fine-tuning file of the answers a larger model gave (distillation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from genserve.api.auth import principal
from genserve.api.errors import APIError
from genserve.api.models import runtime_of
from genserve.api.pages import after_id, listing
from genserve.api.schemas import ChatCompletionRequest, Metadata, WireModel
from genserve.runtime.errors import Unavailable
from genserve.runtime.generation import ChoiceDelta, Collected, Event, Gathering, Started
from genserve.runtime.runtime import Runtime
from genserve.storage.completions import (
    CompletionQuery,
    CompletionRecords,
    CompletionStore,
    LocalCompletions,
    StoredCompletion,
)

log = logging.getLogger(__name__)
router = APIRouter()


def not_found(completion_id: str) -> APIError:
    msg = f"Chat completion with id '{completion_id}' not found."
    return APIError(404, msg, "completion_id", "not_found")


def records_of(rt: Runtime) -> CompletionRecords:
    """Where stored completions are read and written: this process's store, or the one the
    runtime was given (a Ray engine replica's: the control replica's, genserve/ray/records.py)."""
    rt.require_ready()
    if rt.completions is not None:
        return rt.completions
    if rt.database is None:
        raise Unavailable("completion storage is unavailable: the database did not open")
    return LocalCompletions(CompletionStore(rt.database))


# --- storing ---------------------------------------------------------------------------------


async def save(rt: Runtime, project: str, body: ChatCompletionRequest, obj: dict) -> None:
    """Keep an answered completion (the caller checked `store`); a database that did not open
    loses it with a warning, the answer itself is unaffected."""
    if rt.completions is None and rt.database is None:
        log.warning("chat completion %s not stored: the database did not open", obj["id"])
        return
    obj = {**obj, "metadata": body.metadata or {}}
    messages = [stored_message(f"{obj['id']}-{i}", m) for i, m in enumerate(body.messages)]
    record = StoredCompletion(obj["id"], project, obj["created"], obj["model"], obj, messages)
    await records_of(rt).put(record)


def stored_message(message_id: str, message: BaseModel) -> dict[str, Any]:
    """A request message as OpenAI lists it: text content as a string, the parts themselves
    in `content_parts` when the message had parts."""
    fields = message.model_dump(exclude_none=True)
    content = fields.get("content")
    parts = content if isinstance(content, list) else None
    if parts is not None:
        fields["content"] = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
    return {"id": message_id, **fields, "content_parts": parts}


async def kept(
    events: AsyncIterator[Event], started: Started, done: Callable[[Collected], Awaitable[object]]
) -> AsyncIterator[Event]:
    """A stream's events passed through, gathered on the way; `done` gets the whole answer
    once they end (not when the stream fails or the client leaves: nothing whole to keep)."""
    gathering = Gathering(started)
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for d in events:
            assert isinstance(d, ChoiceDelta)
            gathering.add(d)
            yield d
    await done(gathering.result())


# --- the routes ------------------------------------------------------------------------------


class UpdateBody(WireModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None


def metadata_filter(request: Request) -> tuple[tuple[str, str], ...]:
    """`metadata[key]=value` query pairs (the openai client's deepObject encoding)."""
    pairs = []
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            pairs.append((key[len("metadata[") : -1], value))
    return tuple(pairs)


@router.get("/v1/chat/completions")
async def list_completions(
    request: Request,
    model: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "asc",
) -> JSONResponse:
    query = CompletionQuery(
        principal(request).project, model, metadata_filter(request), after, limit,
        order == "desc",
    )  # fmt: skip
    page, more = await records_of(runtime_of(request)).list(query)
    data = [c.body for c in page]
    return JSONResponse(listing(data, more))


@router.get("/v1/chat/completions/{completion_id}")
async def retrieve_completion(completion_id: str, request: Request) -> JSONResponse:
    return JSONResponse((await _get(request, completion_id)).body)


@router.post("/v1/chat/completions/{completion_id}")
async def update_completion(completion_id: str, body: UpdateBody, request: Request) -> JSONResponse:
    """Only the metadata may change (OpenAI's rule); null clears it."""
    records = records_of(runtime_of(request))
    project = principal(request).project
    if not await records.set_metadata(completion_id, project, body.metadata or {}):
        raise not_found(completion_id)
    return JSONResponse((await _get(request, completion_id)).body)


@router.delete("/v1/chat/completions/{completion_id}")
async def delete_completion(completion_id: str, request: Request) -> JSONResponse:
    records = records_of(runtime_of(request))
    if not await records.delete(completion_id, principal(request).project):
        raise not_found(completion_id)
    return JSONResponse({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})


@router.get("/v1/chat/completions/{completion_id}/messages")
async def list_messages(
    completion_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "asc",
) -> JSONResponse:
    messages = (await _get(request, completion_id)).messages
    messages = after_id(messages if order == "asc" else messages[::-1], after, "message")
    return JSONResponse(listing(messages[:limit], len(messages) > limit))


async def _get(request: Request, completion_id: str) -> StoredCompletion:
    records = records_of(runtime_of(request))
    found = await records.get(completion_id, principal(request).project)
    if found is None:
        raise not_found(completion_id)
    return found
