"""POST /v1/chat/completions."""

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
from genserve.api.schemas import ChatCompletionRequest
from genserve.api.stream import sse_response, usage

router = APIRouter()


def reject_chat_extras(body: ChatCompletionRequest) -> None:
    reject_unsupported(body)
    if body.logprobs:
        raise bad_request("`logprobs` is not supported by this server yet", param="logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request(
            f"response_format {body.response_format.type!r} is not supported yet",
            param="response_format",
        )
    if body.tools:
        raise bad_request("tool calling is not supported by this server", param="tools")


def chat_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    # Templates know "system"; OpenAI's newer "developer" role means the same to them.
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    try:
        text = served.tokenizer.apply_chat_template(
            messages,
            chat_template=served.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e
    # The template writes any BOS itself; adding special tokens again would double it.
    return served.tokenizer.encode(text, add_special_tokens=False)


def max_new_tokens(served: ServedModel, body: ChatCompletionRequest, prompt_len: int) -> int:
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None:
        return asked
    room = served.max_len - prompt_len
    if room < 1:
        served.engine.check_context(prompt_len, 1)  # raises context_length_exceeded
    return room


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    served = services(request).get(body.model)
    reject_chat_extras(body)
    prompt = chat_prompt(served, body)
    params = sampling_params(body, max_new_tokens(served, body, len(prompt)))
    cid, created = new_id("chatcmpl"), int(time.time())
    streams = open_streams(
        served.engine, build_requests([prompt], params, body.n or 1, cid), "messages"
    )
    base = {
        "id": cid,
        "created": created,
        "model": served.id,
        "system_fingerprint": served.fingerprint,
    }
    if body.stream:
        return stream_chat(body, base, streams, len(prompt))
    choices = await collect(request, streams)
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage(len(prompt), sum(c.completion_tokens for c in choices)),
        }
    )


def stream_chat(body: ChatCompletionRequest, base: dict, streams: list, prompt_tokens: int):
    base = {**base, "object": "chat.completion.chunk"}
    # OpenAI opens every choice with a role-only delta.
    first = [
        {
            **base,
            "choices": [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        for i in range(len(streams))
    ]

    def frame(d: ChoiceDelta) -> dict | None:
        if not d.text and d.finish_reason is None:
            return None
        delta = {"content": d.text} if d.text else {}
        choice = {"index": d.index, "delta": delta, "logprobs": None}
        choice["finish_reason"] = d.finish_reason
        return {**base, "choices": [choice]}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def usage_frame(completion_tokens: int) -> dict:
        return {**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    return sse_response(streams, first, frame, usage_frame if include_usage else None)
