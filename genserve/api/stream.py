"""Generation events -> SSE frames, the optional usage chunk, and `data: [DONE]`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request as HTTPRequest
from sse_starlette import EventSourceResponse

from genserve.api.auth import principal
from genserve.api.errors import http_error
from genserve.runtime.errors import DomainError
from genserve.runtime.generation import ChoiceDelta, Collected, Event, Started
from genserve.storage.usage import Used

log = logging.getLogger(__name__)

Frame = dict  # one JSON object sent as `data: ...`


def _frame(obj: Frame) -> bytes:
    """One SSE event, encoded here: sse-starlette passes bytes through, where a str went
    through its ServerSentEvent (line splitting, a buffer, the encode) for every token. JSON
    never holds a raw newline, so a frame is one `data:` line."""
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0
) -> dict:
    """OpenAI's CompletionUsage; cached_tokens: prompt tokens served by the prefix cache;
    reasoning_tokens: of the completion's, a reasoning model's thinking."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # As OpenAI sends them, zeros included: clients read e.g. details.reasoning_tokens.
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },  # fmt: skip
    }


def account(http: HTTPRequest, used: Used) -> None:
    """A finished request's tokens: against its API key's tokens-per-minute, and in the usage
    ledger (its project, key and model; /v1/organization/usage/...)."""
    edge = http.app.state.edge
    caller = http.scope.get("state", {}).get("caller")
    if edge.keys is not None and caller is not None:
        (edge.limits or edge.keys).spend(caller, used.input_tokens + used.output_tokens)
    ledger = http.app.state.runtime.usage
    if ledger is not None:
        who = principal(http)
        ledger.add(used, who.project, who.key_id)


def used(started: Started, completion_tokens: int, cached_tokens: int = 0) -> Used:
    """A generation's usage record: its prompt's tokens, and what it generated."""
    return Used("completions", started.model, started.prompt_tokens, completion_tokens,
                cached_tokens)  # fmt: skip


def collected_use(done: Collected) -> Used:
    return used(done.started, done.completion_tokens, done.cached_tokens)


async def first_event(events: AsyncIterator[Event]) -> Started:
    """Admit the request before any byte is sent, so its errors still get their status."""
    try:
        started = await anext(events)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    assert isinstance(started, Started)
    return started


def sse_response(
    http: HTTPRequest,
    events: AsyncIterator[Event],
    started: Started,
    first_frames: list[Frame],
    to_frame: Callable[[ChoiceDelta], Frame | None],
    # (completion tokens, each choice's cached prompt tokens) -> the usage frame
    usage_frame: Callable[[int, dict[int, int]], Frame] | None,
) -> EventSourceResponse:
    """Stream frames; the client going away closes the events, which aborts the requests."""

    async def frames() -> AsyncIterator[bytes]:
        completion_tokens: dict[int, int] = {}
        cached: dict[int, int] = {}
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            for frame in first_frames:
                yield _frame(frame)
            try:
                async for d in events:
                    assert isinstance(d, ChoiceDelta)
                    completion_tokens[d.index] = d.delta.completion_tokens
                    cached[d.index] = d.delta.cached_tokens
                    frame = to_frame(d)
                    if frame is not None:
                        yield _frame(frame)
            except DomainError as e:
                log.error("stream failed: %s", e)
                yield _frame(http_error(e).body())
                return
            finally:  # what was generated counts against the key, even for a client that left
                total = sum(completion_tokens.values())
                account(http, used(started, total, started.cached_tokens(cached)))
        if usage_frame is not None:
            yield _frame(usage_frame(sum(completion_tokens.values()), cached))
        yield b"data: [DONE]\n\n"

    return EventSourceResponse(frames(), ping=15, sep="\n")
