"""Choice deltas -> SSE frames, the optional usage chunk, and `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request as HTTPRequest
from sse_starlette import EventSourceResponse

from genserve.api.generation import ChoiceDelta, engine_api_error, merged, spend_tokens
from genserve.engine.client import EngineError

log = logging.getLogger(__name__)

Frame = dict  # one JSON object sent as `data: ...`


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse_response(
    http: HTTPRequest,
    streams: list,
    prompt_tokens: int,
    first_frames: list[Frame],
    to_frame: Callable[[ChoiceDelta], Frame | None],
    usage_frame: Callable[[int], Frame] | None,
) -> EventSourceResponse:
    """Stream frames; the client going away cancels the generator, which aborts the requests."""

    async def events() -> AsyncIterator[str]:
        completion_tokens: dict[int, int] = {}
        for frame in first_frames:
            yield json.dumps(frame)
        try:
            async for d in merged(streams):
                completion_tokens[d.index] = d.delta.completion_tokens
                frame = to_frame(d)
                if frame is not None:
                    yield json.dumps(frame)
        except EngineError as e:
            log.error("stream failed: %s", e)
            yield json.dumps(engine_api_error(e).body())
            return
        finally:  # what was generated counts against the key, even for a client that left
            spend_tokens(http, prompt_tokens + sum(completion_tokens.values()))
        if usage_frame is not None:
            yield json.dumps(usage_frame(sum(completion_tokens.values())))
        yield "[DONE]"

    return EventSourceResponse(events(), ping=15, sep="\n")
