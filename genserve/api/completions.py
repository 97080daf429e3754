"""POST /v1/completions."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.api.auth import principal
from genserve.api.errors import bad_request
from genserve.api.generation import (
    ChoiceDelta,
    ChoiceState,
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
from genserve.api.limits import check_prompt_bytes, off_loop
from genserve.api.logprobs import completion_logprobs, namer
from genserve.api.models import ServedModel, services
from genserve.api.schemas import CompletionRequest
from genserve.api.stream import sse_response, usage

router = APIRouter()


def check_completion_body(body: CompletionRequest) -> None:
    if body.suffix:
        raise bad_request("`suffix` (insertion) is not supported by these models", "suffix")
    best_of = body.best_of or body.n or 1
    if best_of < (body.n or 1):
        raise bad_request("`best_of` must be at least `n`", "best_of")
    if body.stream and best_of > (body.n or 1):
        raise bad_request("`best_of` cannot be used with `stream`", "best_of")


def prompt_ids(served: ServedModel, prompt) -> list[list[int]]:  # noqa: ANN001 - wire union
    """A string, a list of strings, a token list or a list of token lists -> token lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            check_prompt_bytes(p, served.max_token_bytes, served.context_limit, "prompt")
        ids = served.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        if any(not 0 <= t < served.vocab_size for t in ids):
            raise bad_request(f"prompt token ids must be in [0, {served.vocab_size})", "prompt")
        out.append(ids)
    return out


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    target = services(request).get(body.model, principal(request))
    served = target.served
    apply_defaults(body, served.settings.defaults)
    check_completion_body(body)
    prompts = await off_loop(prompt_ids, served, body.prompt)
    n = body.n or 1
    best_of = body.best_of or n
    group_param = "best_of" if body.best_of else ("n" if len(prompts) == 1 else "prompt")
    check_group(served.engine, len(prompts) * best_of, group_param)
    # best_of ranks candidates by cumulative logprob, so it needs them even when not shown.
    logprobs = body.logprobs if body.logprobs is not None else (0 if best_of > n else None)
    echo_lps = body.logprobs if body.echo else None
    grammar = await grammar_spec(body, served.grammars, background(request))
    max_tokens = body.max_tokens or 16
    longest = max(len(p) for p in prompts)
    check_limits(request, longest, max_tokens, "prompt", served.context_limit)
    params = sampling_params(body, max_tokens, served.vocab_size, logprobs, echo_lps, grammar)
    cid, created = new_id("cmpl"), int(time.time())
    requests = build_requests(prompts, params, best_of, cid, target.adapter)
    streams = open_streams(served.engine, requests, "prompt")
    base = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": target.id,
        "system_fingerprint": served.fingerprint,
    }
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        return stream_completion(request, body, served, base, streams, prompts)
    candidates = await collect(request, streams, prompt_tokens)
    chosen = pick_best(candidates, len(prompts), best_of, n)
    completion_tokens = sum(c.completion_tokens for c in candidates)
    choices = [completion_choice(body, served, c, prompts[i // n], i) for i, c in enumerate(chosen)]
    return JSONResponse(
        {**base, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}
    )


def pick_best(
    candidates: list[ChoiceState], num_prompts: int, best_of: int, n: int
) -> list[ChoiceState]:
    """Per prompt, the n of best_of candidates with the highest cumulative logprob."""
    if best_of == n:
        return candidates
    out = []
    for p in range(num_prompts):
        group = candidates[p * best_of : (p + 1) * best_of]
        out.extend(sorted(group, key=lambda c: c.cumulative_logprob, reverse=True)[:n])
    return out


def completion_choice(
    body: CompletionRequest, served: ServedModel, c: ChoiceState, prompt: list[int], index: int
) -> dict:
    text = "".join(c.text)
    prefix = served.tokenizer.decode(prompt) if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        ids, lps = list(c.token_ids), list(c.logprobs)
        if body.echo:
            ids, lps = prompt + ids, [*c.prompt_logprobs, *lps]
        logprobs = completion_logprobs(
            lps, ids, namer(served.token_text, body.return_tokens_as_token_ids), 0
        )
    return {
        "index": index,
        "text": prefix + text,
        "logprobs": logprobs,
        "finish_reason": c.finish_reason,
    }


def stream_completion(
    http: Request,
    body: CompletionRequest,
    served: ServedModel,
    base: dict,
    streams: list,
    prompts: list,
):
    n = body.n or 1
    offsets = [0] * len(streams)
    first = []
    if body.echo:  # the prompt comes back first, as one chunk per choice
        for i in range(len(streams)):
            text = served.tokenizer.decode(prompts[i // n])
            offsets[i] = len(text)
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
            first.append({**base, "choices": [choice]})

    def frame(d: ChoiceDelta) -> dict | None:
        if not d.text and d.finish_reason is None and not d.delta.logprobs:
            return None
        logprobs = None
        if body.logprobs is not None:
            ids = d.delta.token_ids
            logprobs = completion_logprobs(
                d.delta.logprobs,
                ids,
                namer(served.token_text, body.return_tokens_as_token_ids),
                offsets[d.index],
            )
        offsets[d.index] += len(d.text)
        choice = {"index": d.index, "text": d.text, "logprobs": logprobs}
        choice["finish_reason"] = d.finish_reason
        return {**base, "choices": [choice]}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    prompt_tokens = sum(len(p) for p in prompts)

    def usage_frame(completion_tokens: int) -> dict:
        return {**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    usage_fn = usage_frame if include_usage else None
    return sse_response(http, streams, prompt_tokens, first, frame, usage_fn)
