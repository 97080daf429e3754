"""POST /v1/completions: the body -> a runtime CompletionRequest; its events -> OpenAI's JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.api.auth import principal
from genserve.api.errors import bad_request
from genserve.api.logprobs import completion_logprobs, namer, prompt_logprobs
from genserve.api.models import runtime_of
from genserve.api.sampling import apply_defaults, check_prompt_logprobs, sampling_params
from genserve.api.schemas import CompletionRequest as Body
from genserve.api.stream import account, collected_use, first_event, sse_response, usage
from genserve.api.structured import RESPONSE_FORMAT, output_constraint
from genserve.engine.types import INTERACTIVE, TokenLogprob
from genserve.runtime.generation import (
    ChoiceDelta,
    ChoiceState,
    Collected,
    CompletionRequest,
    Started,
    collect,
    generate,
)
from genserve.runtime.runtime import Runtime

router = APIRouter()


def check_completion_body(body: Body) -> None:
    if body.suffix:
        raise bad_request("`suffix` (insertion) is not supported by these models", "suffix")
    best_of = body.best_of or body.n or 1
    if best_of < (body.n or 1):
        raise bad_request("`best_of` must be at least `n`", "best_of")
    if body.stream and best_of > (body.n or 1):
        raise bad_request("`best_of` cannot be used with `stream`", "best_of")
    check_prompt_logprobs(body.prompt_logprobs, body.stream)


def prompt_list(prompt) -> tuple[str | tuple[int, ...], ...]:  # noqa: ANN001 - wire union
    """A string, a list of strings, a token list or a list of token lists -> one per prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    return tuple(p if isinstance(p, str) else tuple(p) for p in prompt)


def completion_request(
    rt: Runtime, project: str, body: Body, priority: int = INTERACTIVE
) -> CompletionRequest:
    """The body -> the runtime's request (the Batch API builds its requests here too)."""
    target = rt.get(body.model, project)
    apply_defaults(body, target.served.settings.defaults)
    check_completion_body(body)
    constraint = output_constraint(body)
    grammar = constraint.spec if constraint else None
    scored = prompt_scoring(body)
    sampling = sampling_params(body, body.max_tokens, body.logprobs, scored, grammar)
    prompts = prompt_list(body.prompt)
    n, echo = body.n or 1, bool(body.echo)
    stream = bool(body.stream)
    return CompletionRequest(
        target, prompts, sampling, n, body.best_of, echo, priority, stream,
        constraint.param if constraint else RESPONSE_FORMAT, body.truncate_prompt_tokens,
    )  # fmt: skip


def prompt_scoring(body: Body) -> int | None:
    """How many alternatives the engine keeps per prompt token: echo's logprobs column and
    vLLM's prompt_logprobs share one scoring, the larger k (each shows its own k)."""
    echoed = body.logprobs if body.echo else None
    return max((k for k in (echoed, body.prompt_logprobs) if k is not None), default=None)


@router.post("/v1/completions")
async def create_completion(body: Body, request: Request):
    rt = runtime_of(request)
    events = generate(rt, completion_request(rt, principal(request).project, body))
    if body.stream:
        started = await first_event(events)
        return stream_completion(request, body, started, events)
    done = await collect(events, request.is_disconnected)
    account(request, collected_use(done))
    return JSONResponse(text_completion(body, done))


def text_completion(body: Body, done: Collected) -> dict:
    """OpenAI's text_completion object for a collected answer."""
    s = done.started
    choices = [
        completion_choice(body, s, c, s.prompts[i // s.n], i) for i, c in enumerate(done.choices)
    ]
    return {
        **envelope(s),
        "choices": choices,
        "usage": usage(s.prompt_tokens, done.completion_tokens, done.cached_tokens),
    }


def envelope(s: Started) -> dict:
    return {
        "id": s.id,
        "object": "text_completion",
        "created": s.created,
        "model": s.model,
        "system_fingerprint": s.fingerprint,
    }


def completion_choice(
    body: Body, s: Started, c: ChoiceState, prompt: tuple[int, ...], index: int
) -> dict:
    text = "".join(c.text)
    prefix = s.echoes[index // s.n] if body.echo else ""
    name = namer(s.token_text, body.return_tokens_as_token_ids)
    logprobs = None
    if body.logprobs is not None:
        ids, lps = list(c.token_ids), list(c.logprobs)
        if body.echo:
            ids, lps = [*prompt, *ids], [*top_k(c.prompt_logprobs, body.logprobs), *lps]
        logprobs = completion_logprobs(lps, ids, name, 0)
    choice = {
        "index": index,
        "text": prefix + text,
        "logprobs": logprobs,
        "finish_reason": c.finish_reason,
    }
    if body.prompt_logprobs is not None:  # vLLM's, per choice
        k = body.prompt_logprobs
        choice["prompt_logprobs"] = prompt_logprobs(c.prompt_logprobs, prompt, name, k)
    return choice


def top_k(lps: Sequence[TokenLogprob | None], k: int) -> list[TokenLogprob | None]:
    """Prompt logprobs with k alternatives each, where prompt_logprobs had the engine keep
    more for echo's column."""
    return [lp if lp is None or len(lp.top) <= k else replace(lp, top=lp.top[:k]) for lp in lps]


def stream_completion(http: Request, body: Body, started: Started, events):  # noqa: ANN001, ANN201
    base = envelope(started)
    n = started.n
    offsets = [0] * started.choices
    first = []
    # With logprobs, a choice's echo waits for its first delta, which brings the prompt's
    # logprobs (sent up front, it had none: a streamed prompt score was empty).
    echo_later = set(range(started.choices)) if body.echo and body.logprobs is not None else set()
    if body.echo and not echo_later:  # the prompt comes back first, as one chunk per choice
        for i in range(started.choices):
            text = started.echoes[i // n]
            offsets[i] = len(text)
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
            first.append({**base, "choices": [choice]})
    name = namer(started.token_text, body.return_tokens_as_token_ids)

    def frame(d: ChoiceDelta) -> dict | None:
        lead = d.index in echo_later
        if not lead and not d.text and d.finish_reason is None and not d.delta.logprobs:
            return None
        text, ids, lps = d.text, list(d.delta.token_ids), list(d.delta.logprobs)
        if lead:
            echo_later.discard(d.index)
            prompt = started.prompts[d.index // n]
            scored = top_k(d.delta.prompt_logprobs, body.logprobs or 0)
            scored = scored if len(scored) == len(prompt) else [None] * len(prompt)  # aborted
            text, ids, lps = started.echoes[d.index // n] + text, [*prompt, *ids], scored + lps
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(lps, ids, name, offsets[d.index])
        offsets[d.index] += len(text)
        choice = {"index": d.index, "text": text, "logprobs": logprobs}
        choice["finish_reason"] = d.finish_reason
        return {**base, "choices": [choice]}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def usage_frame(completion_tokens: int, cached: dict[int, int]) -> dict:
        counts = usage(started.prompt_tokens, completion_tokens, started.cached_tokens(cached))
        return {**base, "choices": [], "usage": counts}

    usage_fn = usage_frame if include_usage else None
    return sse_response(http, events, started, first, frame, usage_fn)
