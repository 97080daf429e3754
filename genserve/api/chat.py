"""POST /v1/chat/completions: the body -> a runtime ChatRequest; its events -> OpenAI's JSON."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.api import stored_completions as stored
from genserve.api.auth import principal
from genserve.api.errors import bad_request
from genserve.api.logprobs import chat_logprobs, namer, prompt_logprobs
from genserve.api.models import runtime_of
from genserve.api.sampling import apply_defaults, check_prompt_logprobs, sampling_params
from genserve.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    TemplateFields,
    plain_messages,
)
from genserve.api.stream import account, collected_use, first_event, sse_response, usage
from genserve.api.structured import RESPONSE_FORMAT, Constraint, output_constraint
from genserve.api.tools import (
    chat_tools,
    delta_calls,
    delta_function_call,
    is_legacy,
    message_calls,
    message_function_call,
)
from genserve.engine.types import INTERACTIVE
from genserve.runtime.generation import (
    ChatRequest,
    ChoiceDelta,
    ChoiceState,
    Collected,
    Started,
    TemplateOptions,
    collect,
    generate,
)
from genserve.runtime.runtime import Runtime
from genserve.runtime.tools import ToolsRequest

router = APIRouter()


# The field a role's turn must carry (OpenAI's 400 names it): what links a result to its call.
REQUIRED_BY_ROLE = {"tool": "tool_call_id", "function": "name"}


def check_chat_body(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("`top_logprobs` requires `logprobs` to be true", "top_logprobs")
    check_prompt_logprobs(body.prompt_logprobs, body.stream)
    check_messages(body.messages)


def check_messages(messages: list[ChatMessage]) -> None:
    """What links turns together: a result names its call, an assistant turn holds its calls
    in one dialect (chat and /tokenize check the same)."""
    for i, m in enumerate(messages):
        field = REQUIRED_BY_ROLE.get(m.role)
        if field is not None and getattr(m, field) is None:
            why = f"messages with role '{m.role}' must have a '{field}'"
            raise bad_request(f"Missing parameter '{field}': {why}.", f"messages.[{i}].{field}")
        if m.tool_calls and m.function_call is not None:
            msg = "a message holds either `tool_calls` or the deprecated `function_call`"
            raise bad_request(msg, f"messages.[{i}].function_call")


def chat_request(
    rt: Runtime, project: str, body: ChatCompletionRequest, priority: int = INTERACTIVE
) -> ChatRequest:
    """The body -> the runtime's request (the Batch API builds its requests here too)."""
    target = rt.get(body.model, project)
    apply_defaults(body, target.served.settings.defaults)
    check_chat_body(body)
    tools = chat_tools(body)
    constraint = output_constraint(body)
    check_constraint_tools(constraint, tools)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    grammar = constraint.spec if constraint else None
    sampling = sampling_params(body, max_tokens, logprobs, body.prompt_logprobs, grammar)
    messages = plain_messages(body.messages)
    stream = bool(body.stream)
    return ChatRequest(
        target, messages, sampling, body.n or 1, tools, priority, stream,
        template_options(body, body.messages),
        constraint.param if constraint else RESPONSE_FORMAT,
        truncate_prompt_tokens=body.truncate_prompt_tokens,
    )  # fmt: skip


def check_constraint_tools(constraint: Constraint | None, tools: ToolsRequest | None) -> None:
    """Active tools constrain the output with their own grammar: a second one cannot hold too.
    (response_format's own 400 comes from api/tools.py.)"""
    if constraint is None or constraint.param == RESPONSE_FORMAT:
        return
    if tools is not None and tools.active:
        msg = f"`{constraint.param}` cannot be combined with tools unless tool_choice is 'none'"
        raise bad_request(msg, constraint.param)


def template_options(body: TemplateFields, messages: list[ChatMessage]) -> TemplateOptions:
    """vLLM's chat-template controls, checked as vLLM checks them: a final message left open
    for the model to continue takes no generation prompt, and must be the assistant's."""
    keep_open = body.continue_final_message
    if keep_open and body.add_generation_prompt:
        msg = "`continue_final_message` and `add_generation_prompt` cannot both be true"
        raise bad_request(msg, "continue_final_message")
    if keep_open and (not messages or messages[-1].role != "assistant"):
        msg = "`continue_final_message` continues the last message, which must be the assistant's"
        raise bad_request(msg, "messages")
    prompt = body.add_generation_prompt
    documents = tuple(body.documents) if body.documents is not None else None
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:  # the kwargs' own value, where they set one, wins
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    return TemplateOptions(
        not keep_open if prompt is None else prompt, keep_open, kwargs, documents,
    )  # fmt: skip


def chat_message(c: ChoiceState, legacy: bool = False, thinking: Thinking | None = None) -> dict:
    """OpenAI's assistant message: content null when the turn is only tool calls (`legacy`:
    the request used `functions`, so its call is `function_call`); a reasoning model's
    thinking in vLLM's `reasoning` and, as DeepSeek's API and older vLLM name it,
    `reasoning_content`."""
    text = "".join(c.text)
    message = {"role": "assistant", "content": text, "refusal": None}
    if thinking is not None:
        message.update(thinking.fields("".join(c.reasoning) or None))
    if c.tool_calls:
        message["content"] = text or None
        if legacy:
            message["function_call"] = message_function_call(c.tool_calls)
        else:
            message["tool_calls"] = message_calls(c.tool_calls)
    return message


@dataclass(frozen=True, slots=True)
class Thinking:
    """How an answer shows a reasoning model's thinking: its fields, or their nulls when the
    request said include_reasoning: false."""

    include: bool

    def fields(self, text: str | None) -> dict[str, str | None]:
        text = text if self.include else None
        return {"reasoning": text, "reasoning_content": text}


def thinking_of(body: ChatCompletionRequest, started: Started) -> Thinking | None:
    return Thinking(body.include_reasoning) if started.reasoning else None


def finish_reason(reason: str | None, legacy: bool) -> str | None:
    """A call ends a `functions` request with "function_call", as OpenAI's did."""
    return "function_call" if legacy and reason == "tool_calls" else reason


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    rt, project = runtime_of(request), principal(request).project
    events = generate(rt, chat_request(rt, project, body))

    async def keep(done: Collected) -> dict:
        obj = chat_completion(body, done)
        if body.store:
            await stored.save(rt, project, body, obj)
        return obj

    if body.stream:
        started = await first_event(events)
        if body.store:
            events = stored.kept(events, started, keep)
        return stream_chat(request, body, started, events)
    done = await collect(events, request.is_disconnected)
    account(request, collected_use(done))
    return JSONResponse(await keep(done))


def chat_completion(body: ChatCompletionRequest, done: Collected) -> dict:
    """OpenAI's chat.completion object for a collected answer."""
    s = done.started
    name = namer(s.token_text, body.return_tokens_as_token_ids)
    legacy, thinking = is_legacy(body), thinking_of(body, s)
    choices = [
        {
            "index": c.index,
            "message": chat_message(c, legacy, thinking),
            "logprobs": chat_logprobs(c.logprobs, name) if body.logprobs else None,
            "finish_reason": finish_reason(c.finish_reason, legacy),
        }
        for c in done.choices
    ]
    obj = {
        **envelope(s),
        "object": "chat.completion",
        "choices": choices,
        "usage": usage(
            s.prompt_tokens,
            done.completion_tokens,
            done.cached_tokens,
            sum(c.reasoning_tokens for c in done.choices),
        ),  # fmt: skip
    }
    if body.prompt_logprobs is not None:  # vLLM's, at the top: the choices share one prompt
        scored = done.choices[0].prompt_logprobs if done.choices else ()
        obj["prompt_logprobs"] = prompt_logprobs(scored, s.prompts[0], name, body.prompt_logprobs)
    return obj


def envelope(s: Started) -> dict:
    return {"id": s.id, "created": s.created, "model": s.model, "system_fingerprint": s.fingerprint}


def stream_chat(http: Request, body: ChatCompletionRequest, started: Started, events):  # noqa: ANN001, ANN201
    base = {**envelope(started), "object": "chat.completion.chunk"}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if include_usage:  # OpenAI: "all other chunks will also include a usage field" (null)
        base["usage"] = None
    name = namer(started.token_text, body.return_tokens_as_token_ids)
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
        for i in range(started.choices)
    ]

    legacy, thinking = is_legacy(body), thinking_of(body, started)
    reasoning_tokens: dict[int, int] = {}

    def frame(d: ChoiceDelta) -> dict | None:
        reasoning_tokens[d.index] = d.reasoning_tokens
        shown = d.reasoning if thinking is not None and thinking.include else ""
        if (
            not d.text and not shown and d.finish_reason is None and not d.delta.logprobs
            and not d.calls
        ):  # fmt: skip
            return None
        delta: dict = {"content": d.text} if d.text or d.delta.logprobs else {}
        if shown:
            delta.update(thinking.fields(shown))
        if d.calls and legacy:
            delta["function_call"] = delta_function_call(d.calls)
        elif d.calls:
            delta["tool_calls"] = delta_calls(d.calls)
        logprobs = chat_logprobs(d.delta.logprobs, name) if body.logprobs else None
        choice = {"index": d.index, "delta": delta, "logprobs": logprobs}
        choice["finish_reason"] = finish_reason(d.finish_reason, legacy)
        return {**base, "choices": [choice]}

    def usage_frame(completion_tokens: int, cached: dict[int, int]) -> dict:
        counts = usage(
            started.prompt_tokens, completion_tokens, started.cached_tokens(cached),
            sum(reasoning_tokens.values()),
        )  # fmt: skip
        return {**base, "choices": [], "usage": counts}

    usage_fn = usage_frame if include_usage else None
    return sse_response(http, events, started, first, frame, usage_fn)
