"""The generation service: generate(request) -> AsyncIterator[events], and its collector.

Chat and completions call it today (genserve.api.chat, genserve.api.completions), the Responses
API and the batch runner later: none needs FastAPI to run a request. The first event, Started,
comes once the request is admitted; every error before it (a bad prompt, a full queue) is a
domain error raised by that first step, so an HTTP caller can still answer with a status. The
n choices of one call are one group in the engine and one stream of ChoiceDelta events here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from genserve.config import ServerConfig
from genserve.engine.client import AsyncEngine, ContextLengthError, EngineError, GroupStream
from genserve.engine.scheduler import QueueFullError
from genserve.engine.types import (
    INTERACTIVE,
    FailureKind,
    GrammarSpec,
    Request,
    SamplingParams,
    ThinkFirst,
    TokenDelta,
    TokenLogprob,
    UnsupportedSchemaError,
)
from genserve.runtime import reasoning
from genserve.runtime.errors import (
    ClientGone,
    DomainError,
    Internal,
    InvalidRequest,
    Overloaded,
    Unavailable,
)
from genserve.runtime.limits import (
    TEMPLATE_RENDER_S,
    TemplateTimeout,
    check_prompt_bytes,
    off_loop,
    with_deadline,
)
from genserve.runtime.models import ServedModel, Target
from genserve.runtime.reasoning import ReasoningSplitter
from genserve.runtime.runtime import Runtime
from genserve.runtime.tokens import TokenText
from genserve.runtime.tools import (
    CallDelta,
    ToolCall,
    ToolCallParser,
    ToolsRequest,
    detect_format,
    tool_grammar,
)
from genserve.runtime.tools_prompt import template_messages

SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads the seeds of a call's n choices apart
SEED_MASK = (1 << 63) - 1
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# -- requests ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "developer" | "user" | "assistant" | "tool"
    text: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


@dataclass(frozen=True, slots=True)
class TemplateOptions:
    """How the chat template renders the turns: vLLM's chat-template controls."""

    add_generation_prompt: bool = True  # open the assistant's turn after the messages
    continue_final_message: bool = False  # leave the last (assistant) turn open to continue it
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # more variables for the template
    documents: tuple[Mapping[str, str], ...] | None = None  # for templates that render them


@dataclass(frozen=True, slots=True)
class ChatRequest:
    target: Target
    messages: tuple[Message, ...]
    sampling: SamplingParams  # max_tokens None: the rest of the context
    n: int = 1
    tools: ToolsRequest | None = None  # None: no tools given
    priority: int = INTERACTIVE  # engine.types.BACKGROUND for the Batch API's requests
    stream: bool = True  # False: the answer goes back whole (the engine sends it when done)
    template: TemplateOptions = field(default_factory=TemplateOptions)
    grammar_param: str = "response_format"  # the body field sampling.grammar came from
    prompt_param: str = "messages"  # the body field the prompt came from (Responses: input)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last N tokens (-1: context)
    drop_turns: bool = False  # Responses' truncation "auto": the oldest turns go to fit


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    target: Target
    prompts: tuple[str | tuple[int, ...], ...]  # texts or token lists, one group each
    sampling: SamplingParams  # max_tokens None: COMPLETION_MAX_TOKENS
    n: int = 1
    best_of: int | None = None  # candidates per prompt, the best n returned (None: n)
    echo: bool = False
    priority: int = INTERACTIVE
    stream: bool = True  # as ChatRequest's
    grammar_param: str = "response_format"  # as ChatRequest's
    truncate_prompt_tokens: int | None = None  # as ChatRequest's, each prompt


GenerationRequest = ChatRequest | CompletionRequest


# -- events -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Started:
    """The request was admitted; what an answer's envelope needs."""

    id: str
    created: int
    model: str  # the id the request named (an adapter's, or the base model's)
    fingerprint: str
    prompts: tuple[tuple[int, ...], ...]
    n: int  # choices returned per prompt
    best_of: int  # sequences generated per prompt (choices in the stream: prompts x best_of)
    token_text: TokenText  # names tokens in logprobs
    echoes: tuple[str, ...] = ()  # each prompt's text, when the request asked for echo
    reasoning: bool = False  # choices carry the thinking apart (a reasoning model's chat)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.best_of

    def cached_tokens(self, by_choice: dict[int, int]) -> int:
        """Prompt tokens the prefix cache served, counted once per prompt as prompt_tokens
        is (its choices share the prompt; the most any of them was served)."""
        per_prompt: dict[int, int] = {}
        for index, cached in by_choice.items():
            p = index // self.best_of
            per_prompt[p] = max(per_prompt.get(p, 0), cached)
        return sum(per_prompt.values())


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """What one engine step produced for one choice. With tools, `text` is the content only
    and `calls` the pieces of tool calls (finish_reason "tool_calls" when there were any)."""

    index: int
    text: str
    finish_reason: str | None
    delta: TokenDelta
    calls: tuple[CallDelta, ...] = ()
    reasoning: str = ""  # a reasoning model's thinking (runtime/reasoning.py), apart from text
    reasoning_tokens: int = 0  # of the choice's tokens so far, those of its thinking


Event = Started | ChoiceDelta


@dataclass(slots=True)
class ChoiceState:
    """One choice, collected to its end."""

    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    cached_tokens: int = 0  # of its prompt, served by the prefix cache
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0

    def add(self, cd: ChoiceDelta) -> None:
        d = cd.delta
        self.text.append(cd.text)
        self.reasoning.append(cd.reasoning)
        self.reasoning_tokens = cd.reasoning_tokens
        self.cached_tokens = d.cached_tokens or self.cached_tokens
        self.finish_reason = cd.finish_reason or self.finish_reason
        self.completion_tokens = d.completion_tokens
        self._add_calls(cd.calls)
        self.token_ids.extend(d.token_ids)
        self.logprobs.extend(d.logprobs)
        self.prompt_logprobs = self.prompt_logprobs or d.prompt_logprobs

    def _add_calls(self, calls: Sequence[CallDelta]) -> None:
        for c in calls:
            if c.id is not None:
                self.tool_calls.append(ToolCall(c.id, c.name or "", ""))
            last = self.tool_calls[c.index]
            self.tool_calls[c.index] = replace(last, arguments=last.arguments + c.arguments)

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


@dataclass(frozen=True, slots=True)
class Collected:
    started: Started
    choices: list[ChoiceState]  # the n best per prompt, in prompt order
    completion_tokens: int  # of every sequence generated (best_of's candidates too)
    cached_tokens: int = 0  # prompt tokens the prefix cache served (usage's cached_tokens)


# -- the service ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Admitted:
    started: Started
    stream: GroupStream
    index: dict[str, int]  # request id -> choice index
    tool_format: str | None = None  # set when the output may hold tool calls
    forced: bool = False  # tool_choice required or named: the whole output is calls
    tool_names: tuple[str, ...] = ()  # the functions its calls may name
    thinking: Thinking | None = None  # a reasoning model's chat: where its thinking is
    grammar_param: str = "response_format"  # the body field its grammar came from

    def choice_text(self) -> ChoiceText:
        tools = None
        if self.tool_format is not None:
            tools = ToolCallParser(self.tool_format, self.forced, self.tool_names)
        splitter = None if self.thinking is None else self.thinking.splitter()
        end_id = None if self.thinking is None else self.thinking.end_id
        return ChoiceText(splitter, tools, end_id)


@dataclass(frozen=True, slots=True)
class Thinking:
    """Where a reasoning model's thinking starts (the prompt's end says), and the token that
    closes it where that is one token (what counts the thinking's tokens exactly)."""

    prompt_tail: str
    end_id: int | None
    open_id: int | None = None

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter.for_prompt(self.prompt_tail)

    def think_first(self, spec: GrammarSpec | None) -> ThinkFirst | None:
        return reasoning.think_first(self.prompt_tail, spec, self.open_id, self.end_id)


@dataclass(slots=True)
class ChoiceText:
    """One choice's text on its way out: the thinking split off (reasoning models), then tool
    calls parsed from the answer (requests with tools)."""

    splitter: ReasoningSplitter | None
    tools: ToolCallParser | None
    end_id: int | None
    tokens: int = 0  # of the choice so far
    reasoning_tokens: int = 0

    def delta(self, index: int, reason: str | None, d: TokenDelta) -> ChoiceDelta:
        thinking, answer = self._split(d, reason is not None)
        if self.tools is None:
            return ChoiceDelta(index, answer, reason, d, (), thinking, self.reasoning_tokens)
        content, calls = self.tools.feed(answer)
        if reason is not None:
            held, cut = self.tools.finish()
            content, calls = content + held, calls + cut
            if self.tools.calls and reason == "stop":
                reason = "tool_calls"
        return ChoiceDelta(index, content, reason, d, tuple(calls), thinking, self.reasoning_tokens)

    def _split(self, d: TokenDelta, last: bool) -> tuple[str, str]:
        if self.splitter is None:
            return "", d.text
        thinking_before = not self.splitter.done
        thinking, answer = self.splitter.feed(d.text)
        if last:
            more_thinking, more_answer = self.splitter.finish()
            thinking, answer = thinking + more_thinking, answer + more_answer
        ids = d.token_ids
        if thinking_before and self.splitter.inside:  # every token so far was thinking...
            upto = len(ids)
            if self.splitter.done and self.end_id in ids:  # ...up to the closing tag's
                upto = ids.index(self.end_id) + 1
            self.reasoning_tokens = self.tokens + upto
        self.tokens += len(ids)
        return thinking, answer


async def generate(rt: Runtime, request: GenerationRequest) -> AsyncIterator[Event]:
    """Started, then ChoiceDelta events of every choice in arrival order. Closing the iterator
    (a client gone) aborts what is still running; an engine failure raises a domain error."""
    await rt.ensure_loaded(request.target)
    if isinstance(request, ChatRequest):
        admitted = await _admit_chat(rt, request)
    else:
        admitted = await _admit_completion(rt, request)
    plain = admitted.tool_format is None and admitted.thinking is None
    texts: dict[int, ChoiceText] = {}
    try:
        yield admitted.started
        async for d in admitted.stream:
            reason = d.finish_reason.value if d.finish_reason else None
            index = admitted.index[d.request_id]
            if plain:
                yield ChoiceDelta(index, d.text, reason, d)
                continue
            text = texts.get(index) or texts.setdefault(index, admitted.choice_text())
            yield text.delta(index, reason, d)
    except EngineError as e:
        raise failure_error(e, admitted.grammar_param) from e
    finally:
        admitted.stream.close()


Disconnected = Callable[[], Awaitable[bool]]


async def collect(
    events: AsyncIterator[Event], disconnected: Disconnected | None = None, poll_s: float = 0.5
) -> Collected:
    """Every choice to its end (the best n per prompt when best_of asked for more); stopped
    with ClientGone as soon as `disconnected()` says the caller went away."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        started = await anext(events)
        assert isinstance(started, Started)
        gathered = Gathering(started)

        async def run() -> None:
            async for d in events:
                assert isinstance(d, ChoiceDelta)
                gathered.add(d)

        task = asyncio.create_task(run())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=poll_s)
                if not task.done() and disconnected is not None and await disconnected():
                    raise ClientGone("client closed the request")
        finally:
            # Whoever leaves early (a client gone, a cancelled caller: a batch cancelled or
            # stopping) stops `run` first: closing the events while it reads them would raise.
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        task.result()
    return gathered.result()


@dataclass(slots=True)
class Gathering:
    """A group's choices as their deltas arrive (collect's; a stored stream's too)."""

    started: Started
    choices: list[ChoiceState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.choices = [ChoiceState(i) for i in range(self.started.choices)]

    def add(self, d: ChoiceDelta) -> None:
        self.choices[d.index].add(d)

    def result(self) -> Collected:
        s, choices = self.started, self.choices
        share_prompt_logprobs(choices, s.best_of)
        chosen = pick_best(choices, len(s.prompts), s.best_of, s.n)
        cached = s.cached_tokens({c.index: c.cached_tokens for c in choices})
        return Collected(s, chosen, sum(c.completion_tokens for c in choices), cached)


def share_prompt_logprobs(choices: list[ChoiceState], best_of: int) -> None:
    """Each prompt's logprobs, scored by one of its sequences (_sequence_params), given to
    all of them: a choice shows its prompt's, whichever of them best_of keeps."""
    for start in range(0, len(choices), best_of):
        group = choices[start : start + best_of]
        scored = next((c.prompt_logprobs for c in group if c.prompt_logprobs), ())
        for c in group:
            c.prompt_logprobs = c.prompt_logprobs or scored


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


# -- chat -------------------------------------------------------------------------------------
async def _admit_chat(rt: Runtime, request: ChatRequest) -> _Admitted:
    target, served = request.target, request.target.served
    check_group(served.engine, request.n, "n")
    room = served.context_limit - (request.sampling.max_tokens or 1)
    prompt, fmt = await render_prompt(
        rt, served, request.messages, request.tools, request.template, request.prompt_param,
        room if request.drop_turns else None,
    )  # fmt: skip
    prompt = truncated(prompt, request.truncate_prompt_tokens, served.context_limit)
    max_tokens = request.sampling.max_tokens or max(served.context_limit - len(prompt), 1)
    check_limits(rt.config, len(prompt), max_tokens, request.prompt_param, served.context_limit)
    sampling, tools = request.sampling, request.tools
    if tools is not None and tools.active:
        await check_tool_schemas(rt, served, tools)
        sampling = replace(sampling, grammar=tool_grammar(tools, fmt))
    param = "tools" if tools is not None and tools.active else request.grammar_param
    params = await settle(rt, served, sampling, max_tokens, param)
    thinking = _thinking(rt, served, prompt)
    if thinking is not None:  # its grammar (if any) waits for the thinking
        params = replace(params, think_first=thinking.think_first(params.grammar))
    admitted = _open(
        rt, target, "chatcmpl", [prompt], params, request.n, request.n, request.prompt_param,
        request.priority, request.stream,
    )  # fmt: skip
    admitted = replace(admitted, grammar_param=param)
    if thinking is not None:
        started = replace(admitted.started, reasoning=True)
        admitted = replace(admitted, started=started, thinking=thinking)
    if tools is None or not tools.active:
        return admitted
    names = tuple(t.name for t in tools.callable())
    return replace(admitted, tool_format=fmt, forced=tools.choice.mode != "auto", tool_names=names)


def _thinking(rt: Runtime, served: ServedModel, prompt: list[int]) -> Thinking | None:
    """A reasoning model's chat: where its thinking starts, and its tags' token ids."""
    if not reasoning.active(served.template, rt.config.model.reasoning_parser):
        return None
    tail = served.tokenizer.decode(prompt[-8:])
    return Thinking(tail, _tag_id(served, reasoning.CLOSE), _tag_id(served, reasoning.OPEN))


def _tag_id(served: ServedModel, tag: str) -> int | None:
    """The tag's token id where it is one token the model can sample, else None."""
    tok = served.tokenizer
    tid = tok.convert_tokens_to_ids(tag)
    if not isinstance(tid, int) or not 0 <= tid < served.vocab_size:
        return None
    return tid if tok.decode([tid]) == tag else None


async def render_prompt(
    rt: Runtime,
    served: ServedModel,
    messages: Sequence[Message],
    tools: ToolsRequest | None,
    options: TemplateOptions | None = None,
    param: str = "messages",
    room: int | None = None,
) -> tuple[list[int], str]:
    """The prompt's token ids, rendered by the chat template with the tools off the event
    loop, and the tool-call format it speaks: what a chat request runs, and what
    /v1/responses/input_tokens counts (one path, so the count is the prompt's). `param`:
    the body field its 400s name (Responses' `input`). `room`: the tokens the prompt may take,
    its oldest turns dropped to fit (Responses' truncation "auto"); None: all of it."""
    fmt = detect_format(served.template, rt.config.model.tool_call_format)

    async def render(turns: Sequence[Message]) -> list[int]:
        return await off_loop(chat_prompt, served, turns, tools, fmt, options, param)

    if room is None:
        return await render(messages), fmt
    return await fit_turns(render, messages, room), fmt


async def fit_turns(
    render: Callable[[Sequence[Message]], Awaitable[list[int]]],
    messages: Sequence[Message],
    room: int,
) -> list[int]:
    """OpenAI's truncation "auto": the prompt with as few of the oldest turns dropped as make
    it fit in `room` tokens. Whole turns go (a cut falls before a user message, so no tool
    result loses its call), the instructions (the leading system and developer messages)
    stay. Where the last turn alone does not fit either, the whole prompt's own refusal."""
    whole, refusal = await _rendered(render, messages)
    if whole is not None and len(whole) <= room:
        return whole
    head = 0
    while head < len(messages) and messages[head].role in ("system", "developer"):
        head += 1
    cuts = [i for i in range(head + 1, len(messages)) if messages[i].role == "user"]
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:  # the fewest turns dropped: a shorter conversation renders shorter
        mid = (lo + hi) // 2
        fitted, _ = await _rendered(render, [*messages[:head], *messages[cuts[mid] :]])
        if fitted is not None and len(fitted) <= room:
            best, hi = fitted, mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best
    if whole is None:
        raise refusal  # type: ignore[misc] - set where whole is not
    return whole  # too long: check_limits answers its 400


async def _rendered(
    render: Callable[[Sequence[Message]], Awaitable[list[int]]], messages: Sequence[Message]
) -> tuple[list[int] | None, InvalidRequest | None]:
    """The rendered prompt, or None and the refusal of a text too long to tokenize."""
    try:
        return await render(messages), None
    except InvalidRequest as e:
        if e.code != "context_length_exceeded":
            raise
        return None, e


async def check_tool_schemas(rt: Runtime, served: ServedModel, tools: ToolsRequest) -> None:
    """Each tool's parameters must be a schema the grammar enforces: a 400 names the tool."""
    for i, tool in enumerate(tools.tools):
        try:
            spec = GrammarSpec.json_schema(tool.parameters)
            await check_grammar(served, spec)
        except (UnsupportedSchemaError, InvalidRequest) as e:
            where = f"tools[{i}].function.parameters ({tool.name})"
            raise InvalidRequest(str(e).replace("response_format schema", where), "tools") from e


def render_chat(
    served: ServedModel,
    messages: Sequence[Message],
    options: TemplateOptions,
    tools: ToolsRequest | None = None,
    fmt: str = "hermes",
    param: str = "messages",
) -> str:
    plain, extra = template_messages(served.template, messages, tools, fmt)
    if options.documents is not None:
        extra = {**extra, "documents": [dict(d) for d in options.documents]}
    render = lambda: served.tokenizer.apply_chat_template(  # noqa: E731
        plain,
        chat_template=served.template,
        tokenize=False,
        add_generation_prompt=options.add_generation_prompt,
        continue_final_message=options.continue_final_message,
        **{**options.kwargs, **extra},  # the API refused kwargs that would replace these
    )
    try:
        # Call it off the event loop: it can be slow (a template with nested loops).
        return with_deadline(render, TEMPLATE_RENDER_S)
    except TemplateTimeout as e:
        msg = f"the chat template did not render these messages within {TEMPLATE_RENDER_S:g}s"
        raise InvalidRequest(msg, param) from e
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's
        raise InvalidRequest(f"the chat template rejected these messages: {e}", param) from e


def chat_prompt(
    served: ServedModel,
    messages: Sequence[Message],
    tools: ToolsRequest | None = None,
    fmt: str = "hermes",
    options: TemplateOptions | None = None,
    param: str = "messages",
) -> list[int]:
    text = render_chat(served, messages, options or TemplateOptions(), tools, fmt, param)
    check_prompt_bytes(text, served.max_token_bytes, served.context_limit, param)
    # The template writes any BOS itself; adding special tokens again would double it.
    return served.tokenizer.encode(text, add_special_tokens=False)


# -- completions ------------------------------------------------------------------------------
async def _admit_completion(rt: Runtime, request: CompletionRequest) -> _Admitted:
    target, served = request.target, request.target.served
    prompts = await off_loop(prompt_ids, served, request.prompts)
    keep = request.truncate_prompt_tokens
    prompts = [truncated(p, keep, served.context_limit) for p in prompts]
    n = request.n
    best_of = request.best_of or n
    group_param = "best_of" if request.best_of else ("n" if len(prompts) == 1 else "prompt")
    check_group(served.engine, len(prompts) * best_of, group_param)
    sampling = request.sampling
    if sampling.logprobs is None and best_of > n:
        # best_of ranks candidates by cumulative logprob, so it needs them even when not shown.
        sampling = replace(sampling, logprobs=0)
    max_tokens = COMPLETION_MAX_TOKENS if sampling.max_tokens is None else sampling.max_tokens
    longest = max(len(p) for p in prompts)
    check_limits(rt.config, longest, max_tokens, "prompt", served.context_limit)
    params = await settle(rt, served, sampling, max_tokens, request.grammar_param)
    admitted = _open(
        rt, target, "cmpl", prompts, params, n, best_of, "prompt", request.priority,
        request.stream,
    )  # fmt: skip
    admitted = replace(admitted, grammar_param=request.grammar_param)
    if request.echo:
        echoes = tuple(served.tokenizer.decode(p) for p in prompts)
        admitted = replace(admitted, started=replace(admitted.started, echoes=echoes))
    return admitted


def truncated(ids: list[int], keep: int | None, context: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: the context's
    worth), cut from the start so the end a prompt leads up to stays."""
    if keep is None:
        return ids
    keep = context if keep == -1 else keep
    return list(ids[-keep:]) if len(ids) > keep else ids


def prompt_ids(served: ServedModel, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Texts and token lists -> token lists, each checked against the model."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            check_prompt_bytes(p, served.max_token_bytes, served.context_limit, "prompt")
        ids = served.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidRequest("prompt must not be empty", "prompt")
        if any(not 0 <= t < served.vocab_size for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {served.vocab_size})", "prompt")
        out.append(ids)
    return out


# -- what both share --------------------------------------------------------------------------
def check_group(engine: AsyncEngine, sequences: int, param: str) -> None:
    """One call may run at most engine.max_group sequences (a share of the slots)."""
    if sequences > engine.max_group:
        raise InvalidRequest(
            f"this request asks for {sequences} sequences at once; this model runs at most "
            f"{engine.max_group} per request (half of its batch slots)",
            param,
        )


def check_limits(
    config: ServerConfig, prompt_tokens: int, max_tokens: int, prompt_param: str, context: int
) -> None:
    """The operator's ceilings (--max-prompt-tokens, --max-tokens-limit, a model's
    max_context)."""
    if prompt_tokens + max_tokens > context:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            prompt_param,
            "context_length_exceeded",
        )
    sec = config.security
    if sec.max_prompt_tokens is not None and prompt_tokens > sec.max_prompt_tokens:
        msg = f"The prompt has {prompt_tokens} tokens; this server takes {sec.max_prompt_tokens}."
        raise InvalidRequest(msg, prompt_param, "prompt_too_long")
    if sec.max_tokens_limit is not None and max_tokens > sec.max_tokens_limit:
        msg = f"max_tokens is {max_tokens}; this server allows at most {sec.max_tokens_limit}."
        raise InvalidRequest(msg, "max_tokens")


async def settle(
    rt: Runtime,
    served: ServedModel,
    sampling: SamplingParams,
    max_tokens: int,
    grammar_param: str = "response_format",
) -> SamplingParams:
    """The record the engine gets: max_tokens settled, and what only the model can check
    (its vocabulary, its grammar library) checked."""
    vocab = served.vocab_size
    if any(t >= vocab for t in sampling.stop_token_ids):
        raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
    if sampling.top_k > vocab:
        raise InvalidRequest(f"top_k must be at most the vocabulary size, {vocab}", "top_k")
    for token, _ in sampling.logit_bias:
        if not 0 <= token < vocab:
            raise InvalidRequest(f"logit_bias token {token} is not in [0, {vocab})", "logit_bias")
    if any(not 0 <= t < vocab for t in sampling.allowed_token_ids or ()):
        msg = f"allowed_token_ids must be in [0, {vocab})"
        raise InvalidRequest(msg, "allowed_token_ids")
    if sampling.min_tokens > max_tokens:
        raise InvalidRequest("min_tokens must be in [0, max_tokens]")
    if sampling.grammar is not None:
        await check_grammar(served, sampling.grammar, grammar_param)
    banned = await off_loop(bad_words_ids, served, sampling.bad_words) if sampling.bad_words else ()
    return replace(sampling, max_tokens=max_tokens, bad_words_token_ids=banned)


def bad_words_ids(served: ServedModel, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's bad_words as token sequences: each word as it starts a text and, where that
    spells it with other tokens of the same count, as it follows a space (a word is tokenized
    differently at the start and mid-text; vLLM's update_from_tokenizer keeps both)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(served.tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(served.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    if any(not 0 <= t < served.vocab_size for ids in out for t in ids):
        raise InvalidRequest("bad_words hold tokens outside the model's vocabulary", "bad_words")
    return tuple(out)


async def check_grammar(
    served: ServedModel, spec: GrammarSpec, param: str = "response_format"
) -> None:
    """A grammar the engine could not enforce is this request's 400 (see runtime/grammar_check)."""
    try:
        await served.grammars.check(spec)
    except UnsupportedSchemaError as e:
        # A schema from guided_json / structured_outputs.json: its message names that field.
        message = str(e).replace("response_format schema", f"{param} schema")
        raise InvalidRequest(message, param) from e


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice 0 uses the caller's seed as given; the others derive their own from it."""
    if seed is None or index == 0:
        return seed
    return (seed + index * SEED_STRIDE) & SEED_MASK


def _publish_every(rt: Runtime, stream: bool) -> int:
    """Request.publish_every: the server's --stream-interval for a stream; 0 for an answer
    sent whole (its tokens reach the API process once, not one wake-up each)."""
    return rt.config.engine.stream_interval if stream else 0


def _sequence_params(params: SamplingParams, index: int, stream: bool) -> SamplingParams:
    """The params of a prompt's index-th sequence: its own seed and, in an answer sent whole,
    prompt logprobs scored by the first sequence alone. The prompt is the same for all of
    them, so n scorings were n full prefills of every prompt row's logits (none of them
    from the prefix cache) for one result; Gathering.result shares it. A stream sends each
    choice's echo with its first delta, so there every sequence scores the prompt."""
    shared = params.prompt_logprobs is not None and index > 0 and not stream
    scored = None if shared else params.prompt_logprobs
    return replace(params, seed=choice_seed(params.seed, index), prompt_logprobs=scored)


def _open(
    rt: Runtime,
    target: Target,
    prefix: str,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    best_of: int,
    prompt_param: str,
    priority: int = INTERACTIVE,
    stream: bool = True,
) -> _Admitted:
    """Submit prompts x best_of sequences to the engine as one group."""
    cid = f"{prefix}-{uuid.uuid4().hex}"
    requests = [
        Request(
            f"{cid}-{p * best_of + i}",
            list(ids),
            _sequence_params(params, i, stream),
            target.adapter,
            priority=priority,
            tenant=target.project,
            publish_every=_publish_every(rt, stream),
        )
        for p, ids in enumerate(prompts)
        for i in range(best_of)
    ]
    stream = open_group(rt, target.served.engine, requests, prompt_param)
    served = target.served
    if rt.metrics is not None:
        rt.metrics.admitted(served.id, n, len(prompts))
    started = Started(
        cid, int(time.time()), target.id, served.fingerprint,
        tuple(tuple(p) for p in prompts), n, best_of, served.token_text,
    )  # fmt: skip
    return _Admitted(started, stream, {r.request_id: k for k, r in enumerate(requests)})


def open_group(
    rt: Runtime, engine: AsyncEngine, requests: list[Request], prompt_param: str
) -> GroupStream:
    try:
        return engine.open(requests)
    except ContextLengthError as e:
        raise InvalidRequest(str(e), prompt_param, "context_length_exceeded") from e
    except EngineError as e:  # its engine stopped (the model is being unloaded)
        raise failure_error(e) from e
    except QueueFullError as e:
        raise Overloaded(
            f"{e}; retry shortly", code="rate_limit_exceeded", retry_after_s=rt.config.retry_after_s
        ) from e


def failure_error(exc: EngineError, grammar_param: str = "response_format") -> DomainError:
    """The engine ended one request: the caller's input was at fault (a grammar past its
    limits: named as the field it came from, which only this side knows), its model went
    away, or something broke inside."""
    f = exc.failure
    if f.kind is FailureKind.INVALID:
        param = grammar_param if f.param == "response_format" else f.param
        return InvalidRequest(f.message.replace("response_format", param), param)
    if f.kind is FailureKind.UNAVAILABLE:
        return Unavailable(f.message)
    return Internal(f.message)
