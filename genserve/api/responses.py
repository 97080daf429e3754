"""/v1/responses: create (plain or streamed with OpenAI's typed events), retrieve, delete,
input_items. A response runs through runtime.generation.generate as a ChatRequest, the path chat
completions take (sampling, grammar, tool-call parsing); this module only maps the wire.

Stored responses (`store`, the default) live in the SQLite store of their project
(storage/responses.py) and survive restarts; `previous_response_id` continues from one: its
whole context (earlier inputs and outputs) comes before the new input.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from genserve.api.auth import principal
from genserve.api.errors import APIError, bad_request, http_error
from genserve.api.logprobs import TokenIds, namer
from genserve.api.models import runtime_of
from genserve.api.responses_wire import (
    Envelope,
    ResponsesRequest,
    call_item,
    call_status,
    input_items,
    logprob_entries,
    message_item,
    messages,
    new_id,
    output_items,
    response_object,
    tool_defs,
    usage,
    wants_logprobs,
)
from genserve.api.sampling import apply_defaults, sampling_params
from genserve.api.stream import first_event, spend_tokens
from genserve.api.tools import RESPONSES_PARAMS, named_choice, tools_request
from genserve.runtime.errors import DomainError, Unavailable
from genserve.runtime.generation import (
    ChatRequest,
    ChoiceDelta,
    Disconnected,
    Started,
    collect,
    generate,
)
from genserve.runtime.runtime import Runtime
from genserve.runtime.tokens import TokenText
from genserve.runtime.tools import ToolCall
from genserve.storage.responses import ResponseStore, StoredResponse

log = logging.getLogger(__name__)
router = APIRouter()


def not_found(response_id: str, param: str = "response_id") -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param, "not_found")


def store_of(rt: Runtime) -> ResponseStore:
    rt.require_ready()
    if rt.database is None:
        raise Unavailable("response storage is unavailable: the database did not open")
    return ResponseStore(rt.database)


@dataclass(slots=True)
class Prepared:
    """A Responses body made into the chat request it runs as, and what storing it needs."""

    rt: Runtime
    project: str
    body: ResponsesRequest
    request: ChatRequest
    items: list[dict[str, Any]]  # this request's input items
    context: list[dict[str, Any]]  # the chain's items before them

    def namer(self) -> TokenText | TokenIds | None:
        """What names the output's tokens in its logprobs; None when none were asked for."""
        if self.request.sampling.logprobs is None:
            return None
        served = self.request.target.served
        return namer(served.token_text, self.body.return_tokens_as_token_ids)


def prepare(rt: Runtime, project: str, body: ResponsesRequest) -> Prepared:
    """400/404s before anything runs: the model, tools, the chain, the input items."""
    target = rt.get(body.model, project)
    apply_defaults(body, target.served.settings.defaults)
    if body.background:
        raise bad_request("background responses are not supported", "background")
    if body.conversation is not None:  # silently dropped, the app would lose its state
        msg = "conversations are not supported; chain responses with previous_response_id"
        raise bad_request(msg, "conversation")
    body.response_format = body.format_()
    tools = tools_request(
        tool_defs(body.tools), named_choice(body.tool_choice),
        body.parallel_tool_calls, body.response_format, RESPONSES_PARAMS,
    )  # fmt: skip
    context: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store_of(rt).get(body.previous_response_id, project)
        if previous is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        context = previous.context
    items = input_items(body.input)
    sampling = sampling_params(body, body.max_output_tokens, wants_logprobs(body))
    history = messages(body.instructions, context + items)
    chat = ChatRequest(target, history, sampling, 1, tools, stream=bool(body.stream))
    return Prepared(rt, project, body, chat, items, context)


async def respond(p: Prepared, disconnected: Disconnected | None = None) -> tuple[dict, int]:
    """Run a prepared response to its end and store it (when asked): (the Response object,
    the tokens it cost). What the route answers; callers without HTTP (batches) use it too."""
    done = await collect(generate(p.rt, p.request), disconnected)
    s, choice = done.started, done.choices[0]
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    use = usage(s.prompt_tokens, done.completion_tokens, done.cached_tokens)
    obj = response_object(envelope(s, p.body), status, output_items(choice, p.namer()), use)
    save(p, obj)
    return obj, s.prompt_tokens + done.completion_tokens


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    prepared = prepare(runtime_of(request), principal(request).project, body)
    if body.stream:
        events = generate(prepared.rt, prepared.request)
        started = await first_event(events)
        return EventSourceResponse(stream(request, prepared, started, events), sep="\n")
    obj, tokens = await respond(prepared, request.is_disconnected)
    spend_tokens(request, tokens)
    return JSONResponse(obj)


def envelope(s: Started, body: ResponsesRequest) -> Envelope:
    return Envelope(new_id("resp"), s.created, s.model, body)


def save(p: Prepared, obj: dict) -> None:
    if p.body.store is False:
        return
    if p.rt.database is None:  # answered anyway; retrieving it will say why not
        log.warning("response %s not stored: the database did not open", obj["id"])
        return
    context = p.context + p.items + obj["output"]
    store_of(p.rt).put(
        StoredResponse(obj["id"], p.project, obj["created_at"], obj, p.items, context)
    )


# -- streaming --------------------------------------------------------------------------------
@dataclass(slots=True)
class StreamState:
    """Where a streamed response is: its output items so far and the open one."""

    env: Envelope
    name: TokenText | TokenIds | None = None  # names tokens in logprobs, when asked for
    seq: int = 0
    output: list[dict] = field(default_factory=list)
    text_id: str | None = None  # the message item being written
    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # the open message's, so far
    unsent: list[dict] = field(default_factory=list)  # of those, not yet in a delta event
    calls: dict[int, tuple[str, ToolCall]] = field(default_factory=dict)  # index -> item, call

    def event(self, kind: str, **fields: Any) -> dict:  # noqa: ANN401
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return {"event": kind, "data": json.dumps(data)}


async def stream(
    http: Request, prepared: Prepared, started: Started, events
) -> AsyncIterator[dict]:  # noqa: ANN001
    st = StreamState(envelope(started, prepared.body), prepared.namer())
    completion_tokens, reason, cached = 0, None, 0
    async with contextlib.aclosing(events):
        yield st.event("response.created", response=response_object(st.env, "in_progress", []))
        yield st.event("response.in_progress", response=response_object(st.env, "in_progress", []))
        try:
            async for d in events:
                assert isinstance(d, ChoiceDelta)
                completion_tokens, reason = d.delta.completion_tokens, d.finish_reason or reason
                cached = d.delta.cached_tokens or cached
                for frame in step(st, d):
                    yield frame
        except DomainError as e:
            log.error("response stream failed: %s", e)
            err = http_error(e)
            yield st.event("error", code=err.code, message=err.message, param=err.param)
            return
        finally:
            spend_tokens(http, started.prompt_tokens + completion_tokens)
    status = "incomplete" if reason == "length" else "completed"
    for frame in close_all(st, status):
        yield frame
    use = usage(started.prompt_tokens, completion_tokens, cached)
    obj = response_object(st.env, status, st.output, use)
    save(prepared, obj)
    yield st.event(f"response.{status}", response=obj)


def step(st: StreamState, d: ChoiceDelta) -> list[dict]:
    out = []
    if st.name is not None and not d.calls:  # a call's tokens are its arguments, not text
        st.unsent += logprob_entries(d.delta.logprobs, st.name)
    if d.text:
        out += open_text(st)
        st.text.append(d.text)
        st.logprobs += st.unsent
        out.append(
            st.event(
                "response.output_text.delta",
                item_id=st.text_id,
                output_index=len(st.output),
                content_index=0,
                delta=d.text,
                logprobs=st.unsent,
            )  # fmt: skip
        )
        st.unsent = []
    for c in d.calls:
        if c.id is not None:
            out += close_text(st, "completed")
            out += open_call(st, c.index, ToolCall(c.id, c.name or "", ""))
        if c.arguments:
            item_id, call = st.calls[c.index]
            grown = ToolCall(call.id, call.name, call.arguments + c.arguments)
            st.calls[c.index] = (item_id, grown)
            out.append(
                st.event(
                    "response.function_call_arguments.delta",
                    item_id=item_id,
                    output_index=len(st.output),
                    delta=c.arguments,
                )  # fmt: skip
            )
    return out


def open_text(st: StreamState) -> list[dict]:
    if st.text_id is not None:
        return []
    st.text_id = new_id("msg")
    index = len(st.output)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return [
        st.event(
            "response.output_item.added", output_index=index,
            item=message_item(st.text_id, "", "in_progress"),
        ),
        st.event(
            "response.content_part.added", item_id=st.text_id, output_index=index,
            content_index=0, part=part,
        ),
    ]  # fmt: skip


def close_text(st: StreamState, status: str) -> list[dict]:
    if st.text_id is None:
        return []
    text, item_id, index = "".join(st.text), st.text_id, len(st.output)
    logprobs, st.logprobs, st.unsent = st.logprobs + st.unsent, [], []
    item = message_item(item_id, text, status, logprobs)
    st.output.append(item)
    st.text_id, st.text = None, []
    return [
        st.event(
            "response.output_text.done", item_id=item_id, output_index=index,
            content_index=0, text=text, logprobs=logprobs,
        ),
        st.event(
            "response.content_part.done", item_id=item_id, output_index=index,
            content_index=0, part=item["content"][0],
        ),
        st.event("response.output_item.done", output_index=index, item=item),
    ]  # fmt: skip


def open_call(st: StreamState, index: int, call: ToolCall) -> list[dict]:
    out = close_call(st)
    item_id = new_id("fc")
    st.calls[index] = (item_id, call)
    item = call_item(item_id, call, "in_progress")
    return [*out, st.event("response.output_item.added", output_index=len(st.output), item=item)]


def close_call(st: StreamState) -> list[dict]:
    """Closes the call being written (only the last one can be open)."""
    open_ = [i for i, (item_id, _) in st.calls.items() if not _closed(st, item_id)]
    if not open_:
        return []
    item_id, call = st.calls[open_[-1]]
    index = len(st.output)
    item = call_item(item_id, call, call_status(call))
    st.output.append(item)
    return [
        st.event(
            "response.function_call_arguments.done", item_id=item_id, output_index=index,
            name=call.name, arguments=call.arguments,
        ),
        st.event("response.output_item.done", output_index=index, item=item),
    ]  # fmt: skip


def _closed(st: StreamState, item_id: str) -> bool:
    return any(item["id"] == item_id for item in st.output)


def close_all(st: StreamState, status: str) -> list[dict]:
    out = close_text(st, status) + close_call(st)
    if not st.output:  # an empty answer is still one (empty) message, as OpenAI sends it
        out += open_text(st) + close_text(st, status)
    return out


# -- stored responses -------------------------------------------------------------------------
@router.get("/v1/responses/{response_id}")
async def retrieve_response(
    response_id: str, request: Request, stream: bool = False
) -> JSONResponse:
    if stream:  # OpenAI replays a background response's events; none runs here
        msg = "streaming a stored response needs a background response, not supported here"
        raise bad_request(msg, "stream")
    found = store_of(runtime_of(request)).get(response_id, principal(request).project)
    if found is None:
        raise not_found(response_id)
    return JSONResponse(found.body)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    if not store_of(runtime_of(request)).delete(response_id, principal(request).project):
        raise not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> JSONResponse:
    found = store_of(runtime_of(request)).get(response_id, principal(request).project)
    if found is None:
        raise not_found(response_id)
    items = found.input_items if order == "asc" else found.input_items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"no input item `{after}` in this response", "after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )
