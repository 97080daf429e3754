"""POST /v1/chat/completions."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.api.auth import principal
from genserve.api.errors import bad_request
from genserve.api.generation import (
    ChoiceDelta,
    apply_defaults,
    background,
    build_requests,
    check_group,
    check_limits,
    collect,
    grammar_spec,
    new_id,
    open_streams,
    sampling_params,
)
from genserve.api.limits import (
    TEMPLATE_RENDER_S,
    TemplateTimeout,
    check_prompt_bytes,
    off_loop,
    with_deadline,
)
from genserve.api.logprobs import chat_logprobs, namer
from genserve.api.models import ServedModel, services
from genserve.api.schemas import ChatCompletionRequest, ChatMessage
from genserve.api.stream import sse_response, usage

router = APIRouter()


def check_chat_body(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("`top_logprobs` requires `logprobs` to be true", "top_logprobs")
    if body.tools:
        raise bad_request("tool calling is not supported by this server", param="tools")


def render_chat(served: ServedModel, messages: list[ChatMessage], generation_prompt: bool) -> str:
    # Templates know "system"; OpenAI's newer "developer" role means the same to them.
    plain = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]
    render = lambda: served.tokenizer.apply_chat_template(  # noqa: E731
        plain,
        chat_template=served.template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    try:
        # Call it off the event loop: it can be slow (a template with nested loops).
        return with_deadline(render, TEMPLATE_RENDER_S)
    except TemplateTimeout as e:
        msg = f"the chat template did not render these messages within {TEMPLATE_RENDER_S:g}s"
        raise bad_request(msg, "messages") from e
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e


def chat_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    text = render_chat(served, body.messages, generation_prompt=True)
    check_prompt_bytes(text, served.max_token_bytes, served.context_limit, "messages")
    # The template writes any BOS itself; adding special tokens again would double it.
    return served.tokenizer.encode(text, add_special_tokens=False)


def max_new_tokens(served: ServedModel, body: ChatCompletionRequest, prompt_len: int) -> int:
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None:
        return asked
    return max(served.context_limit - prompt_len, 1)  # too long a prompt: check_limits says so


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    target = services(request).get(body.model, principal(request))
    served = target.served
    apply_defaults(body, served.settings.defaults)
    check_chat_body(body)
    check_group(served.engine, body.n or 1, "n")
    prompt = await off_loop(chat_prompt, served, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = max_new_tokens(served, body, len(prompt))
    check_limits(request, len(prompt), max_tokens, "messages", served.context_limit)
    grammar = await grammar_spec(body, served.grammars, background(request))
    params = sampling_params(body, max_tokens, served.vocab_size, logprobs, grammar=grammar)
    cid, created = new_id("chatcmpl"), int(time.time())
    streams = open_streams(
        served.engine,
        build_requests([prompt], params, body.n or 1, cid, target.adapter),
        "messages",
    )
    base = {
        "id": cid,
        "created": created,
        "model": target.id,
        "system_fingerprint": served.fingerprint,
    }
    if body.stream:
        return stream_chat(request, body, served, base, streams, len(prompt))
    choices = await collect(request, streams, len(prompt))
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                    "logprobs": chat_logprobs(
                        c.logprobs, namer(served.token_text, body.return_tokens_as_token_ids)
                    )
                    if body.logprobs
                    else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage(len(prompt), sum(c.completion_tokens for c in choices)),
        }
    )


def stream_chat(
    http: Request,
    body: ChatCompletionRequest,
    served: ServedModel,
    base: dict,
    streams: list,
    prompt_tokens: int,
):
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
        if not d.text and d.finish_reason is None and not d.delta.logprobs:
            return None
        delta = {"content": d.text} if d.text or d.delta.logprobs else {}
        logprobs = (
            chat_logprobs(
                d.delta.logprobs, namer(served.token_text, body.return_tokens_as_token_ids)
            )
            if body.logprobs
            else None
        )
        choice = {"index": d.index, "delta": delta, "logprobs": logprobs}
        choice["finish_reason"] = d.finish_reason
        return {**base, "choices": [choice]}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def usage_frame(completion_tokens: int) -> dict:
        return {**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    usage_fn = usage_frame if include_usage else None
    return sse_response(http, streams, prompt_tokens, first, frame, usage_fn)
