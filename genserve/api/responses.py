"""/v1/responses: create (plain, streamed with OpenAI's typed events, or in the background),
retrieve (or follow a background one's events), cancel, delete, input_items, input_tokens. A
response runs through runtime.generation.generate as a ChatRequest, the path chat completions
take (sampling, grammar, tool-call parsing); this module only maps the wire.

Stored responses (`store`, the default) live in the SQLite store of their project
(storage/responses.py) and survive restarts; `previous_response_id` continues from one: its
whole context (earlier inputs and outputs) comes before the new input. `conversation` runs one in
a conversation instead (api/conversations.py): its items come first, and the response's input
and output join them once it has ended. Background responses (`background: true`) run on in this
process apart from their request (responses_background.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from genserve.api.auth import principal
from genserve.api.chat import check_constraint_tools
from genserve.api.conversations import context_of, join, join_here
from genserve.api.errors import APIError, bad_request, http_error
from genserve.api.logprobs import TokenIds, namer
from genserve.api.models import runtime_of
from genserve.api.pages import after_id, listing
from genserve.api.responses_background import (
    BackgroundResponses,
    ForwardedWrites,
    Frame,
    Run,
    RunStore,
    follow,
    replay,
)
from genserve.api.responses_events import StreamState, advance, close_all, step
from genserve.api.responses_wire import (
    Envelope,
    InputTokensRequest,
    ResponseInputs,
    ResponsesRequest,
    input_items,
    messages,
    new_id,
    output_items,
    response_object,
    tool_defs,
    usage,
    wants_logprobs,
)
from genserve.api.sampling import apply_defaults, sampling_params
from genserve.api.stream import account, collected_use, first_event, used
from genserve.api.structured import RESPONSE_FORMAT, Constraint, output_constraint
from genserve.api.tools import RESPONSES_PARAMS, named_choice, tools_request
from genserve.runtime.errors import DomainError, Unavailable
from genserve.runtime.generation import (
    ChatRequest,
    ChoiceDelta,
    Disconnected,
    Started,
    collect,
    generate,
    render_prompt,
)
from genserve.runtime.runtime import Runtime
from genserve.runtime.tokens import TokenText
from genserve.runtime.tools import ToolsRequest
from genserve.storage.conversations import ConversationStore
from genserve.storage.responses import (
    RUNNING,
    LocalResponses,
    ResponseRecords,
    ResponseStore,
    StoredResponse,
)
from genserve.storage.usage import Used

__all__ = ["StreamState", "close_all", "router", "step"]  # the events' module, re-exported
log = logging.getLogger(__name__)
router = APIRouter()
MAX_SEQ = 2**62  # a sequence number past any stream's, within SQLite's integers
# Under Ray, for a background response that runs on another replica: how often its stored
# state is read, how long a cancel waits for its end to be stored, and how long a stream
# waits for a new event before it takes the run as gone with its replica.
POLL_S = 0.5
CANCEL_WAIT_S = 10.0
STALE_S = 60.0


def not_found(response_id: str, param: str = "response_id") -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param, "not_found")


def store_of(rt: Runtime) -> ResponseStore:
    """This process's store: where a background response's run writes as it goes."""
    rt.require_ready()
    if rt.database is None:
        raise Unavailable("response storage is unavailable: the database did not open")
    return ResponseStore(rt.database)


def records_of(rt: Runtime) -> ResponseRecords:
    """Where stored responses are read and written: this process's store, or the one the
    runtime was given (a Ray engine replica's: the control replica's, genserve/ray/records.py)."""
    if rt.responses is not None:
        rt.require_ready()
        return rt.responses
    return LocalResponses(store_of(rt))


def background_of(http: Request) -> BackgroundResponses:
    return http.app.state.background


def elsewhere(rt: Runtime) -> bool:
    """Whether the store is shared with other replicas (under Ray), so that a background
    response stored as running may run on another one."""
    return rt.responses is not None


@dataclass(slots=True)
class Prepared:
    """A Responses body made into the chat request it runs as, and what storing it needs."""

    rt: Runtime
    project: str
    body: ResponsesRequest
    request: ChatRequest
    items: list[dict[str, Any]]  # this request's input items
    context: list[dict[str, Any]]  # the chain's (or the conversation's) items before them
    conversation: str | None  # the conversation it runs in: its turn joins it at the end

    def namer(self) -> TokenText | TokenIds | None:
        """What names the output's tokens in its logprobs; None when none were asked for."""
        if self.request.sampling.logprobs is None:
            return None
        served = self.request.target.served
        return namer(served.token_text, self.body.return_tokens_as_token_ids)


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a body's prompt is made of, checked: its tools, the chain's (or conversation's)
    items, its own."""

    tools: ToolsRequest | None
    context: list[dict[str, Any]]
    items: list[dict[str, Any]]
    conversation: str | None

    def history(self, instructions: str | None) -> tuple:
        return messages(instructions, self.context + self.items)


async def inputs(rt: Runtime, project: str, body: ResponseInputs) -> Inputs:
    """400/404s naming the field: tools, the chain or the conversation, the input items."""
    conversation = body.conversation_id()
    if conversation is not None and body.previous_response_id is not None:
        msg = "`conversation` and `previous_response_id` cannot be used together: a response "
        raise bad_request(msg + "continues either a conversation or a chain", "conversation")
    tools = tools_request(
        tool_defs(body.tools), named_choice(body.tool_choice),
        body.parallel_tool_calls, body.format_(), RESPONSES_PARAMS,
    )  # fmt: skip
    context = await chain(rt, project, body.previous_response_id)
    items = input_items(body.input) if body.input is not None else []
    if conversation is not None:
        context = await context_of(rt, project, conversation, items)
    return Inputs(tools, context, items, conversation)


async def chain(rt: Runtime, project: str, previous_id: str | None) -> list[dict[str, Any]]:
    """The items a continuation sees before its own; one whose response still runs has no
    output yet to continue from (a 400, as a client racing its background response needs)."""
    if previous_id is None:
        return []
    previous = await records_of(rt).get(previous_id, project)
    if previous is None:
        raise not_found(previous_id, "previous_response_id")
    if previous.status in RUNNING:
        msg = f"Response '{previous_id}' is still {previous.status}: continue it once it has ended."
        raise bad_request(msg, "previous_response_id")
    return previous.context


TEXT_FORMAT = "text.format"  # the field Responses' response_format is built from


def named_as_text_format(e: APIError) -> APIError:
    """A 400 about the response_format built from `text.format`, named as OpenAI's Responses
    name it: `text.format` (its schema: `text.format.schema`), never chat's field (which a
    Responses body does not have: its response_format is always text.format's)."""
    schema = f"{RESPONSE_FORMAT}.json_schema.schema"
    if (e.param or "").startswith(RESPONSE_FORMAT):
        e.param = f"{TEXT_FORMAT}.schema" if schema in e.message else TEXT_FORMAT
    e.message = e.message.replace(schema, f"{TEXT_FORMAT}.schema")
    e.message = e.message.replace(RESPONSE_FORMAT, TEXT_FORMAT)
    e.args = (e.message,)
    return e


async def prepare(rt: Runtime, project: str, body: ResponsesRequest) -> Prepared:
    """400/404s before anything runs: the model, tools, the chain, the input items."""
    try:
        return await _prepare(rt, project, body)
    except APIError as e:
        raise named_as_text_format(e) from None


async def _prepare(rt: Runtime, project: str, body: ResponsesRequest) -> Prepared:
    target = rt.get(body.model, project)
    apply_defaults(body, target.served.settings.defaults)
    if body.background and body.store is False:  # it is polled and resumed from the store
        raise bad_request("a background response must be stored: drop `store: false`", "store")
    body.response_format = body.format_()
    given = await inputs(rt, project, body)
    constraint = output_constraint(body)  # text.format, or vLLM's fields as on chat
    check_constraint_tools(constraint, given.tools)
    grammar = constraint.spec if constraint is not None else None
    sampling = sampling_params(body, body.max_output_tokens, wants_logprobs(body), grammar=grammar)
    history = given.history(body.instructions)
    # A background response's deltas come as they are made, streamed or not: polls see them.
    stream = bool(body.stream or body.background)
    chat = ChatRequest(
        target, history, sampling, 1, given.tools, stream=stream, template=body.template(),
        grammar_param=grammar_param(constraint),
        prompt_param="input", drop_turns=body.truncation == "auto",
    )  # fmt: skip
    return Prepared(rt, project, body, chat, given.items, given.context, given.conversation)


def grammar_param(constraint: Constraint | None) -> str:
    """The field the runtime's 400s about the grammar name (a schema the grammar library
    refuses, one past its limits while running): text.format, or vLLM's field it came from."""
    if constraint is None or constraint.param == RESPONSE_FORMAT:
        return TEXT_FORMAT
    return constraint.param


async def respond(p: Prepared, disconnected: Disconnected | None = None) -> tuple[dict, Used]:
    """Run a prepared response to its end and store it (when asked): (the Response object,
    the tokens it cost). What the route answers; callers without HTTP (batches) use it too."""
    done = await collect(generate(p.rt, p.request), disconnected)
    s, choice = done.started, done.choices[0]
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    use = usage(
        s.prompt_tokens, done.completion_tokens, done.cached_tokens, choice.reasoning_tokens
    )
    obj = response_object(envelope(s, p.body), status, output_items(choice, p.namer()), use)
    await save(p, obj)
    return obj, collected_use(done)


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    prepared = await prepare(runtime_of(request), principal(request).project, body)
    if body.background:
        return await start_background(request, prepared)
    if body.stream:
        events = generate(prepared.rt, prepared.request)
        started = await first_event(events)
        return EventSourceResponse(stream(request, prepared, started, events), sep="\n")
    obj, cost = await respond(prepared, request.is_disconnected)
    account(request, cost)
    return JSONResponse(obj)


def envelope(s: Started, body: ResponsesRequest) -> Envelope:
    return Envelope(new_id("resp"), s.created, s.model, body)


async def save(p: Prepared, obj: dict) -> None:
    """A response that ended with an output: its turn joins its conversation (with `store:
    false` too: the conversation is a store the caller asked for), and it is kept if asked."""
    if p.conversation is not None:
        await join(p.rt, p.project, p.conversation, p.items + obj["output"])
    if p.body.store is False:
        return
    if p.rt.responses is None and p.rt.database is None:
        # answered anyway; retrieving it will say why not
        log.warning("response %s not stored: the database did not open", obj["id"])
        return
    context = p.context + p.items + obj["output"]
    await records_of(p.rt).put(
        StoredResponse(obj["id"], p.project, obj["created_at"], obj, p.items, context)
    )


# -- streaming --------------------------------------------------------------------------------
async def stream(
    http: Request, prepared: Prepared, started: Started, events
) -> AsyncIterator[dict]:  # noqa: ANN001
    st = StreamState(envelope(started, prepared.body), prepared.namer())
    async with contextlib.aclosing(events):
        yield st.event("response.created", response=response_object(st.env, "in_progress", []))
        yield st.event("response.in_progress", response=response_object(st.env, "in_progress", []))
        try:
            async for d in events:
                assert isinstance(d, ChoiceDelta)
                for frame in advance(st, d):
                    yield frame
        except DomainError as e:
            log.error("response stream failed: %s", e)
            err = http_error(e)
            yield st.event("error", code=err.code, message=err.message, param=err.param)
            return
        finally:
            account(http, used(started, st.completion_tokens, st.cached_tokens))
    for frame in close_all(st, st.status):
        yield frame
    use = usage(started.prompt_tokens, st.completion_tokens, st.cached_tokens, st.reasoning_tokens)
    obj = response_object(st.env, st.status, st.output, use)
    await save(prepared, obj)
    yield st.event(f"response.{st.status}", response=obj)


# -- background -------------------------------------------------------------------------------
async def start_background(http: Request, p: Prepared) -> Response:
    """Admit it (its 400s and 429s answer this request), store it `queued`, run it apart from
    this request; answer the queued Response object, or follow its events when streamed."""
    records = records_of(p.rt)  # a 503 before anything runs when there is nowhere to keep it
    events = generate(p.rt, p.request)
    started = await first_event(events)
    st = StreamState(envelope(started, p.body), p.namer())
    context = p.context + p.items
    run = Run(
        st, run_store(http, p, st.env.id), started.prompt_tokens, context,
        lambda cost: account(http, cost),
    )  # fmt: skip
    if isinstance(run.store, ForwardedWrites):
        run.settle = run.store.settle
    run.on_output = joins(p, run.store)
    row = StoredResponse(st.env.id, p.project, st.env.created_at, run.snapshot(), p.items, context)
    try:
        await records.put(row, run.begin())
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        if run.settle is not None:
            await run.settle()
        raise
    background_of(http).start(run, events)
    if p.body.stream:  # the client leaving ends only its own following, not the run
        return EventSourceResponse(follow(run, -1), sep="\n")
    return JSONResponse(run.snapshot())


def run_store(http: Request, p: Prepared, response_id: str) -> RunStore:
    """Where a run writes: this process's store, or under Ray the control replica's (its
    writes forwarded in order; a cancel asked through another replica cancels it here)."""
    if p.rt.responses is None:
        return store_of(p.rt)
    background = background_of(http)
    return ForwardedWrites(
        p.rt.responses, p.project, response_id, lambda: background.cancel_id(response_id)
    )


def joins(p: Prepared, store: RunStore) -> Callable[[list[dict]], None] | None:
    """A run's conversation turn, appended once it has ended with an output: in this
    process's store as its end is, or under Ray after its forwarded writes."""
    if (conversation := p.conversation) is None:
        return None
    if isinstance(store, ForwardedWrites):
        return lambda output: store.later(
            lambda: join(p.rt, p.project, conversation, p.items + output)
        )
    conversations = ConversationStore(store_of(p.rt).db)
    return lambda output: join_here(conversations, p.project, conversation, p.items + output)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> JSONResponse:
    """Cancel a background response that runs; again, and it answers the cancelled one.
    One that ended otherwise, or that was not created in the background, is a 400."""
    store, project = records_of(runtime_of(request)), principal(request).project
    found = await stored(store, response_id, project)
    if not found.background:
        msg = "Cannot cancel a synchronous response: only responses created with "
        raise bad_request(msg + "`background: true` can be cancelled.", "response_id")
    run = background_of(request).live(response_id)
    if run is not None:
        await background_of(request).cancel(run)
        found = await stored(store, response_id, project)
    elif found.status in RUNNING and elsewhere(runtime_of(request)):
        found = await cancel_elsewhere(store, response_id, project)
    if found.status in RUNNING:  # nothing runs it any more (its end was not stored)
        await store.update(response_id, project, found.body | {"status": "cancelled"})
        found = await stored(store, response_id, project)
    if found.status != "cancelled":
        article = "an" if found.status[0] in "aeiou" else "a"  # an incomplete one
        raise bad_request(f"Cannot cancel {article} {found.status} response.", "response_id")
    return JSONResponse(found.body)


async def stored(store: ResponseRecords, response_id: str, project: str) -> StoredResponse:
    found = await store.get(response_id, project)
    if found is None:
        raise not_found(response_id)
    return found


async def frames_of(frames: Iterable[Frame]) -> AsyncIterator[Frame]:
    for frame in frames:
        yield frame


async def cancel_elsewhere(
    store: ResponseRecords, response_id: str, project: str
) -> StoredResponse:
    """Under Ray, a run on another replica: ask for its cancel through the store, which that
    replica reads every CANCEL_CHECK_S, and wait for its end to be stored. One still running
    after CANCEL_WAIT_S is answered as it stands (its replica is likely gone)."""
    await store.request_cancel(response_id, project)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while True:
        found = await stored(store, response_id, project)
        if found.status not in RUNNING or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(POLL_S)


async def polled(
    store: ResponseRecords, response_id: str, project: str, after: int
) -> AsyncIterator[Frame]:
    """A background response that runs on another replica (under Ray): its events as they are
    stored, read every POLL_S until its stored status is final. The status is read before the
    events: its last events are stored with its final status, so none is missed. Ends after
    STALE_S without a new event (its replica is likely gone), as a cut stream."""
    fresh = time.monotonic()
    while True:
        found = await store.get(response_id, project)
        events = await store.events_after(response_id, project, after)
        for frame in replay(events):
            yield frame
        if events:
            after, fresh = events[-1].seq, time.monotonic()
        if found is None or found.status not in RUNNING or time.monotonic() - fresh > STALE_S:
            return
        await asyncio.sleep(POLL_S)


# -- stored responses -------------------------------------------------------------------------
@router.get("/v1/responses/{response_id}")
async def retrieve_response(
    response_id: str,
    request: Request,
    stream: bool = False,
    starting_after: Annotated[int, Query(ge=-1, le=MAX_SEQ)] | None = None,
) -> Response:
    """The Response object (a running one as it stands); with `stream`, a background
    response's events after `starting_after`, then the live ones until it ends."""
    store, project = records_of(runtime_of(request)), principal(request).project
    found = await stored(store, response_id, project)
    run = background_of(request).live(response_id) if found.background else None
    if not stream:
        return JSONResponse(run.snapshot() if run is not None else found.body)
    if not found.background:  # its events were sent once, to its caller, and not kept
        msg = "only a response created with `background: true` can be streamed again"
        raise bad_request(msg, "stream")
    after = -1 if starting_after is None else starting_after
    if run is not None:
        return EventSourceResponse(follow(run, after), sep="\n")
    if found.status in RUNNING:  # it runs on another replica (under Ray)
        return EventSourceResponse(polled(store, response_id, project, after), sep="\n")
    ended = await store.events_after(response_id, project, after)
    return EventSourceResponse(frames_of(replay(ended)), sep="\n")


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    """A background response still running is cancelled first (its run would write it)."""
    store, project = records_of(runtime_of(request)), principal(request).project
    found = await stored(store, response_id, project)
    run = background_of(request).live(response_id)
    if run is not None:
        await background_of(request).cancel(run)
    elif found.background and found.status in RUNNING and elsewhere(runtime_of(request)):
        await cancel_elsewhere(store, response_id, project)
    if not await store.delete(response_id, project):
        raise not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.post("/v1/responses/input_tokens")
async def count_input_tokens(body: InputTokensRequest, request: Request) -> JSONResponse:
    """The prompt a Responses body would run, counted: the same items, chain and tools,
    rendered by the same template call as generation."""
    if body.model is None:
        raise bad_request("`model` is required: it names the tokenizer and template", "model")
    rt, project = runtime_of(request), principal(request).project
    target = rt.get(body.model, project)
    try:
        given = await inputs(rt, project, body)
    except APIError as e:
        raise named_as_text_format(e) from None
    history = given.history(body.instructions)
    # What it would run: with truncation "auto", what fits beside one new token.
    room = target.served.context_limit - 1 if body.truncation == "auto" else None
    prompt, _ = await render_prompt(
        rt, target.served, history, given.tools, body.template(), "input", room
    )
    return JSONResponse({"object": "response.input_tokens", "input_tokens": len(prompt)})


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> JSONResponse:
    found = await records_of(runtime_of(request)).get(response_id, principal(request).project)
    if found is None:
        raise not_found(response_id)
    items = found.input_items if order == "asc" else found.input_items[::-1]
    items = after_id(items, after, "input item")
    return JSONResponse(listing(items[:limit], len(items) > limit, empty=None))
