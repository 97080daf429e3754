"""POST /tokenize and POST /detokenize, in vLLM's shape."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, StrictBool

from genserve.api.auth import principal
from genserve.api.chat import check_messages, template_options
from genserve.api.errors import bad_request
from genserve.api.models import runtime_of
from genserve.api.schemas import ChatMessage, TemplateFields, WireModel, plain_messages
from genserve.runtime.generation import TemplateOptions, render_chat
from genserve.runtime.limits import off_loop

router = APIRouter()


class TokenizeRequest(TemplateFields):
    """`messages` are rendered with chat's template controls (add_generation_prompt, ...), so
    the count is the prompt chat would run."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(WireModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    tokens: list[Annotated[int, Field(ge=0)]]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    served = runtime_of(request).get(body.model, principal(request).project).served
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of `prompt` and `messages`", "prompt")
    check_messages(body.messages or [])  # what chat would refuse is not counted either
    options = TemplateOptions()
    if body.messages is not None:
        options = template_options(body, body.messages)
    ids = await off_loop(token_ids, served, body, options)  # a 3.9 MB prompt took ~3 s
    return {"count": len(ids), "max_model_len": served.max_len, "tokens": ids}


def token_ids(served, body: TokenizeRequest, options: TemplateOptions) -> list[int]:  # noqa: ANN001
    if body.messages is not None:
        text = render_chat(served, plain_messages(body.messages), options)
        return served.tokenizer.encode(text, add_special_tokens=False)
    return served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    served = runtime_of(request).get(body.model, principal(request).project).served
    if any(t >= served.vocab_size for t in body.tokens):
        raise bad_request(f"token ids must be in [0, {served.vocab_size})", "tokens")
    return {"prompt": served.tokenizer.decode(body.tokens)}
