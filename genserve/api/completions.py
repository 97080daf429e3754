"""POST /v1/completions."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.api.errors import bad_request
from genserve.api.generation import (
    ChoiceDelta,
    build_requests,
    collect,
    new_id,
    open_streams,
    reject_unsupported,
    sampling_params,
)
from genserve.api.models import ServedModel, services
from genserve.api.schemas import CompletionRequest
from genserve.api.stream import sse_response, usage

router = APIRouter()


def reject_completion_extras(body: CompletionRequest) -> None:
    reject_unsupported(body)
    if body.echo:
        raise bad_request("`echo` is not supported by this server yet", param="echo")
    if body.logprobs is not None:
        raise bad_request("`logprobs` is not supported by this server yet", param="logprobs")
    if body.suffix:
        raise bad_request("`suffix` is not supported by this model", param="suffix")
    if body.best_of not in (None, body.n or 1):
        raise bad_request("`best_of` different from `n` is not supported yet", param="best_of")


def prompt_ids(served: ServedModel, prompt) -> list[list[int]]:  # noqa: ANN001 - wire union
    """A string, a list of strings, a token list or a list of token lists -> token lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = served.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        vocab = len(served.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
        out.append(ids)
    return out


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    served = services(request).get(body.model)
    reject_completion_extras(body)
    prompts = prompt_ids(served, body.prompt)
    params = sampling_params(body, body.max_tokens or 16)
    n = body.n or 1
    cid, created = new_id("cmpl"), int(time.time())
    streams = open_streams(served.engine, build_requests(prompts, params, n, cid), "prompt")
    prompt_tokens = sum(len(p) for p in prompts)
    base = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": served.id,
        "system_fingerprint": served.fingerprint,
    }
    if body.stream:
        return stream_completion(body, base, streams, prompt_tokens)
    choices = await collect(request, streams)
    completion_tokens = sum(c.completion_tokens for c in choices)
    return JSONResponse(
        {
            **base,
            "choices": [
                {
                    "index": c.index,
                    "text": "".join(c.text),
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }
    )


def stream_completion(body: CompletionRequest, base: dict, streams: list, prompt_tokens: int):
    def frame(d: ChoiceDelta) -> dict | None:
        if not d.text and d.finish_reason is None:
            return None
        choice = {"index": d.index, "text": d.text, "logprobs": None}
        choice["finish_reason"] = d.finish_reason
        return {**base, "choices": [choice]}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def usage_frame(completion_tokens: int) -> dict:
        return {**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    return sse_response(streams, [], frame, usage_frame if include_usage else None)
