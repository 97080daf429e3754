"""What chat and completions share: body -> engine requests -> merged choice deltas."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HTTPRequest

from genserve.api.errors import APIError, bad_request
from genserve.api.limits import GRAMMAR_BUDGET_S, BackgroundPool
from genserve.api.schemas import SamplingFields
from genserve.engine.client import AsyncEngine, ContextLengthError, EngineError
from genserve.engine.scheduler import QueueFullError
from genserve.engine.types import (
    JSON_OBJECT,
    FailureKind,
    GrammarSpec,
    Request,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    UnsupportedSchemaError,
)

SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads the seeds of a call's n choices apart
SEED_MASK = (1 << 63) - 1
RETRY_AFTER_S = 1  # a step takes milliseconds; slots free up quickly


@dataclass(slots=True)
class ChoiceState:
    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    def add(self, d: TokenDelta) -> None:
        self.text.append(d.text)
        self.finish_reason = d.finish_reason.value if d.finish_reason else self.finish_reason
        self.completion_tokens = d.completion_tokens
        self.token_ids.extend(d.token_ids)
        self.logprobs.extend(d.logprobs)
        self.prompt_logprobs = self.prompt_logprobs or d.prompt_logprobs

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    text: str
    finish_reason: str | None
    delta: TokenDelta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def parse_logit_bias(
    bias: dict[str, float] | None, vocab_size: int
) -> tuple[tuple[int, float], ...]:
    """Sorted (token, bias) pairs, one per token: keys naming the same id ("1", "01") add up,
    as they did when the sampler added them one by one."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            msg = f"logit_bias keys must be token ids, got {key!r}"
            raise bad_request(msg, "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias token {token} is not in [0, {vocab_size})", "logit_bias")
        out[token] = out.get(token, 0.0) + float(value)
    return tuple(sorted(out.items()))


async def grammar_spec(
    body: SamplingFields,
    grammars: Any,
    pool: BackgroundPool,  # noqa: ANN401
) -> GrammarSpec | None:
    """response_format -> a grammar the engine enforces; 400 for what cannot be enforced.

    Compiled on a low-priority worker thread (`pool`) within GRAMMAR_BUDGET_S (a 12-deep anyOf
    took 4.5 s on the event loop); one that runs past it is refused now and remembered as
    refused, so the engine thread never compiles it either.
    """
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    try:
        if rf.type == JSON_OBJECT:
            spec = GrammarSpec.json_object()
        elif rf.json_schema is None or rf.json_schema.schema_ is None:
            raise UnsupportedSchemaError("response_format.json_schema.schema is required")
        else:
            spec = GrammarSpec.json_schema(rf.json_schema.schema_)
        await asyncio.wait_for(pool.run(grammars.validate, spec), GRAMMAR_BUDGET_S)
    except UnsupportedSchemaError as e:
        raise bad_request(str(e), "response_format") from e
    except TimeoutError as e:
        msg = f"response_format schema did not compile within {GRAMMAR_BUDGET_S:g}s"
        grammars.refuse(spec, msg)
        raise bad_request(msg, "response_format") from e
    return spec


def background(http: HTTPRequest) -> BackgroundPool:
    """The app's pool for costly per-request work (see BackgroundPool)."""
    return http.app.state.background


def check_group(engine: AsyncEngine, sequences: int, param: str) -> None:
    """One call may run at most engine.max_group sequences (a share of the slots)."""
    if sequences > engine.max_group:
        raise bad_request(
            f"this request asks for {sequences} sequences at once; this model runs at most "
            f"{engine.max_group} per request (half of its batch slots)",
            param,
        )


def apply_defaults(body: SamplingFields, defaults: dict[str, Any]) -> None:
    """A model's serving defaults fill the sampling fields the request left out."""
    for name, value in defaults.items():
        if name not in body.model_fields_set and name in type(body).model_fields:
            setattr(body, name, value)


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    vocab_size: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    if body.stop_token_ids and any(t >= vocab_size for t in body.stop_token_ids):
        raise bad_request(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")
    if body.top_k is not None and body.top_k > vocab_size:
        raise bad_request(f"top_k must be at most the vocabulary size, {vocab_size}", "top_k")
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),  # vLLM's -1 and 0 both mean "off"
            min_p=body.min_p or 0.0,
            max_tokens=max_tokens,
            stop=body.stop_list(),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            seed=body.seed,
            ignore_eos=bool(body.ignore_eos),
            min_tokens=body.min_tokens or 0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=parse_logit_bias(body.logit_bias, vocab_size),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
        )
    except ValueError as e:
        raise bad_request(str(e)) from e


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice 0 uses the caller's seed as given; the others derive their own from it."""
    if seed is None or index == 0:
        return seed
    return (seed + index * SEED_STRIDE) & SEED_MASK


def build_requests(
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    prefix: str,
    adapter: str | None = None,
) -> list[Request]:
    out = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            seeded = SamplingParams(**{**_fields(params), "seed": choice_seed(params.seed, i)})
            out.append(Request(f"{prefix}-{p * n + i}", list(ids), seeded, adapter))
    return out


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in SamplingParams.__slots__}


def open_streams(
    engine: AsyncEngine, requests: list[Request], prompt_param: str
) -> list[AsyncIterator[TokenDelta]]:
    try:
        return engine.open(requests)
    except ContextLengthError as e:
        raise bad_request(str(e), param=prompt_param, code="context_length_exceeded") from e
    except EngineError as e:  # its engine stopped (the model is being unloaded)
        raise engine_api_error(e) from e
    except QueueFullError as e:
        raise APIError(
            429,
            f"{e}; retry shortly",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from e


async def merged(streams: list[AsyncIterator[TokenDelta]]) -> AsyncIterator[ChoiceDelta]:
    """Deltas of all choices in arrival order. Closing this closes (and aborts) every stream."""
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async for d in stream:
                reason = d.finish_reason.value if d.finish_reason else None
                queue.put_nowait(ChoiceDelta(index, d.text, reason, d))
            queue.put_nowait(None)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:  # a stream whose task never started still has to be released
            with contextlib.suppress(Exception):
                await s.aclose()


def check_limits(
    http: HTTPRequest, prompt_tokens: int, max_tokens: int, prompt_param: str, context: int
) -> None:
    """The operator's ceilings (--max-prompt-tokens, --max-tokens-limit, a model's
    max_context), as 400s."""
    if prompt_tokens + max_tokens > context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            prompt_param,
            "context_length_exceeded",
        )
    sec = http.app.state.config.security
    if sec.max_prompt_tokens is not None and prompt_tokens > sec.max_prompt_tokens:
        msg = f"The prompt has {prompt_tokens} tokens; this server takes {sec.max_prompt_tokens}."
        raise bad_request(msg, prompt_param, "prompt_too_long")
    if sec.max_tokens_limit is not None and max_tokens > sec.max_tokens_limit:
        msg = f"max_tokens is {max_tokens}; this server allows at most {sec.max_tokens_limit}."
        raise bad_request(msg, "max_tokens")


def spend_tokens(http: HTTPRequest, tokens: int) -> None:
    """Count a finished request's tokens against its API key's tokens-per-minute."""
    keys = http.app.state.edge.keys
    caller = http.scope.get("state", {}).get("caller")
    if keys is not None and caller is not None:
        keys.spend(caller, tokens)


async def collect(
    http: HTTPRequest, streams: list[AsyncIterator[TokenDelta]], prompt_tokens: int
) -> list[ChoiceState]:
    """All choices to the end; aborted at once if the client disconnects while we wait."""
    choices = [ChoiceState(i) for i in range(len(streams))]

    async def run() -> None:
        async for d in merged(streams):
            choices[d.index].add(d.delta)

    task = asyncio.create_task(run())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await http.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "client closed the request")
    translate_engine_errors(task)
    spend_tokens(http, prompt_tokens + sum(c.completion_tokens for c in choices))
    return choices


def translate_engine_errors(task: asyncio.Task) -> None:
    exc = task.exception()
    if isinstance(exc, EngineError):
        raise engine_api_error(exc) from exc
    if exc is not None:
        raise exc


_FAILURE_STATUS = {FailureKind.INVALID: 400, FailureKind.UNAVAILABLE: 503}


def engine_api_error(exc: EngineError) -> APIError:
    """The engine ended one request: 400 if its own input was at fault (a schema past the
    grammar's limits), 503 if its model went away, else 500."""
    f = exc.failure
    status = _FAILURE_STATUS.get(f.kind, 500)
    return APIError(status, f.message, f.param if status == 400 else None)
