"""/v1/batches: create, list, retrieve, cancel — OpenAI's Batch objects; and the handler that
runs a batch's requests through the online routes' own code.

The runner (genserve.runtime.batches) owns the state machine and durability; this module checks
what a create names (a `batch` file of the caller's project, a supported endpoint), shapes the
Batch object, and gives the runner `handle`: a line's body is validated with the same pydantic
schema as an online call and answered by the same functions (chat_request -> generate ->
collect -> chat_completion), so a line's output or error is what the online call would return.
A batch belongs to the project of the key that created it: another project's id is a 404.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import ConfigDict, ValidationError

from genserve.api.auth import Principal, principal
from genserve.api.chat import chat_completion, chat_request
from genserve.api.completions import completion_request, text_completion
from genserve.api.embeddings import EmbeddingRequest, embeddings
from genserve.api.errors import APIError, bad_request, http_error, validation_error
from genserve.api.files import expiry_seconds, get_record
from genserve.api.models import runtime_of
from genserve.api.responses import prepare, respond
from genserve.api.responses_wire import ResponsesRequest
from genserve.api.schemas import ChatCompletionRequest, CompletionRequest, Metadata, WireModel
from genserve.engine.types import BACKGROUND
from genserve.runtime.batches import (
    COMPLETION_WINDOWS,
    ENDPOINTS,
    BatchCall,
    BatchFinishedError,
    BatchReply,
    BatchRunner,
)
from genserve.runtime.errors import DomainError, NotReady, Overloaded
from genserve.runtime.generation import collect, generate
from genserve.runtime.runtime import Runtime
from genserve.storage.batches import BatchRecord, Progress, new_batch_id
from genserve.storage.usage import Used

router = APIRouter()


# -- running one line -------------------------------------------------------------------------
async def _chat(rt: Runtime, project: str, raw: dict[str, Any]) -> BatchReply:
    body = ChatCompletionRequest.model_validate(raw)
    _no_stream(body.stream)
    done = await collect(generate(rt, chat_request(rt, project, body, BACKGROUND)))
    reply = chat_completion(body, done)
    return BatchReply(200, reply, done.started.prompt_tokens, done.completion_tokens)


async def _completion(rt: Runtime, project: str, raw: dict[str, Any]) -> BatchReply:
    body = CompletionRequest.model_validate(raw)
    _no_stream(body.stream)
    done = await collect(generate(rt, completion_request(rt, project, body, BACKGROUND)))
    reply = text_completion(body, done)
    return BatchReply(200, reply, done.started.prompt_tokens, done.completion_tokens)


async def _response(rt: Runtime, project: str, raw: dict[str, Any]) -> BatchReply:
    body = ResponsesRequest.model_validate(raw)
    _no_stream(body.stream)
    if body.background:  # a batch line is already run apart from any request
        raise bad_request("`background` is not supported in a batch", "background")
    prepared = await prepare(rt, project, body)
    prepared.request = replace(prepared.request, priority=BACKGROUND)
    reply, _ = await respond(prepared)
    use = reply.get("usage") or {}
    return BatchReply(200, reply, use.get("input_tokens", 0), use.get("output_tokens", 0))


async def _embedding(rt: Runtime, project: str, raw: dict[str, Any]) -> BatchReply:
    reply = await embeddings(rt, project, EmbeddingRequest.model_validate(raw))
    return BatchReply(200, reply, reply["usage"]["prompt_tokens"], 0)


def _no_stream(stream: bool | None) -> None:
    if stream:
        raise bad_request("`stream` is not supported in a batch", "stream")


Route = Callable[[Runtime, str, dict[str, Any]], Awaitable[BatchReply]]
# One per runtime.batches.ENDPOINTS entry.
ROUTES: dict[str, Route] = {
    "/v1/responses": _response,
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/embeddings": _embedding,
}


async def handle(rt: Runtime, call: BatchCall) -> BatchReply:
    """One line, answered as its online call would be: 200 and its body, or the error's
    status and OpenAI's error body. A full engine or a model still loading is retried."""
    try:
        reply = await ROUTES[call.endpoint](rt, call.project, call.body)
        if rt.usage is not None:  # a batch's lines count for its project, under no key
            rt.usage.add(batch_used(call.endpoint, reply), call.project, None, batch=True)
        return reply
    except ValidationError as e:
        err = validation_error(e.errors())
    except (Overloaded, NotReady) as e:
        return BatchReply(429, http_error(e).body(), retry=True)
    except DomainError as e:
        err = http_error(e)
    except APIError as e:
        err = e
    return BatchReply(err.status, err.body())


def batch_used(endpoint: str, reply: BatchReply) -> Used:
    """A line's usage record, from its answer (cached tokens where its usage names them)."""
    usage = reply.body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    kind = "embeddings" if endpoint == "/v1/embeddings" else "completions"
    return Used(kind, str(reply.body.get("model", "")), reply.input_tokens, reply.output_tokens,
                int(details.get("cached_tokens") or 0))  # fmt: skip


def batch_handler(rt: Runtime) -> Callable[[BatchCall], Awaitable[BatchReply]]:
    async def run(call: BatchCall) -> BatchReply:
        return await handle(rt, call)

    return run


# -- wire shapes ------------------------------------------------------------------------------
class CreateBatchRequest(WireModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Metadata | None = None
    output_expires_after: dict[str, Any] | None = None  # for the output and error files

    def output_expires_s(self) -> int | None:
        policy = self.output_expires_after
        if policy is None:
            return None
        param = "output_expires_after"
        return expiry_seconds(policy.get("anchor"), policy.get("seconds"), param)


def batch_card(b: BatchRecord, p: Progress) -> dict:
    """OpenAI's Batch. Its schema types the optional fields as plain strings and integers, so
    one that has no value yet is left out rather than sent as null."""
    card: dict[str, Any] = {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": b.model,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "expires_at": b.expires_at,
        **b.times,
        "request_counts": {"total": b.total, "completed": p.completed, "failed": p.failed},
        "usage": {
            "input_tokens": p.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": p.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p.input_tokens + p.output_tokens,
        },
        "metadata": b.metadata,
    }
    if b.errors:
        data = [
            {"code": e.code, "message": e.message, "param": e.param, "line": e.line}
            for e in b.errors
        ]
        card["errors"] = {"object": "list", "data": data}
    return {k: v for k, v in card.items() if v is not None or k == "metadata"}


# -- routes -----------------------------------------------------------------------------------
def batch_runner(request: Request) -> BatchRunner:
    rt = runtime_of(request)
    rt.file_store()  # unavailable while loading or when storage failed, as files say
    if rt.batches is None:
        raise APIError(503, "the Batch API is not available on this server")
    return rt.batches


def get_batch(runner: BatchRunner, batch_id: str, who: Principal) -> BatchRecord:
    """The batch, if `who`'s project owns it; 404 alike for a missing and a foreign one."""
    batch = runner.store.get(batch_id)
    if batch is None or batch.project != who.project:
        raise APIError(404, f"No batch found with id {batch_id}", "batch_id", "batch_not_found")
    return batch


def card_of(runner: BatchRunner, batch: BatchRecord) -> dict:
    return batch_card(batch, runner.store.progress(batch.id))


def check_create(runner: BatchRunner, body: CreateBatchRequest, who: Principal) -> None:
    if body.endpoint not in ENDPOINTS:
        msg = f"`endpoint` must be one of {', '.join(ENDPOINTS)}; got {body.endpoint!r}"
        raise bad_request(msg, "endpoint", "invalid_value")
    if body.completion_window not in COMPLETION_WINDOWS:
        windows = ", ".join(COMPLETION_WINDOWS)
        raise bad_request(f"`completion_window` must be one of {windows}", "completion_window")
    record = get_record(runner.files, body.input_file_id, who, "input_file_id")
    if record.purpose != "batch":
        raise bad_request(
            f"{record.id} was uploaded with purpose `{record.purpose}`; a batch needs purpose "
            "`batch`",
            "input_file_id",
        )


@router.post("/v1/batches")
async def create_batch(body: CreateBatchRequest, request: Request) -> dict:
    runner = batch_runner(request)
    who = principal(request)
    check_create(runner, body, who)
    body.output_expires_s()  # checked before anything is created
    now = int(time.time())
    batch = runner.create(
        BatchRecord(
            id=new_batch_id(),
            project=who.project,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            created_at=now,
            expires_at=now + COMPLETION_WINDOWS[body.completion_window],
            metadata=body.metadata,
            output_expires_s=body.output_expires_s(),
        )
    )
    return card_of(runner, batch)


@router.get("/v1/batches")
async def list_batches(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    runner = batch_runner(request)
    page = runner.store.list(after, limit, principal(request).project)
    data = [card_of(runner, b) for b in page.data]
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": page.has_more}
    if data:
        body["first_id"], body["last_id"] = data[0]["id"], data[-1]["id"]
    return body


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request) -> dict:
    runner = batch_runner(request)
    return card_of(runner, get_batch(runner, batch_id, principal(request)))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict:
    runner = batch_runner(request)
    get_batch(runner, batch_id, principal(request))
    try:
        batch = runner.cancel(batch_id)
    except BatchFinishedError as e:
        raise bad_request(str(e), "batch_id", "batch_already_finished") from None
    return card_of(runner, batch)
