"""The wire's `tools` and `tool_choice` -> runtime.tools.ToolsRequest, checked once; tool calls
-> OpenAI's JSON (chat's message and delta shapes). Chat completions and Responses share it.

Chat's deprecated `functions` / `function_call` (which OpenAI still serves, and older LangChain
sends) are the same request: tools of type function and a tool_choice, at most one call, that
comes back as `message.function_call` with finish_reason "function_call"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from genserve.api.errors import bad_request
from genserve.api.schemas import (
    ChatCompletionRequest,
    ChatTool,
    FunctionDef,
    NamedToolChoice,
    ResponseFormat,
)
from genserve.runtime.tools import CallDelta, ToolCall, ToolChoice, ToolDef, ToolsRequest


class HasName(Protocol):
    name: str


EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class ToolParams:
    """What a body calls its tools and its choice (its errors name them), and the choice
    modes it takes without tools."""

    tools: str = "tools"
    choice: str = "tool_choice"
    without_tools: tuple[str, ...] = ()


# Chat (and the legacy dialect): OpenAI answers 400 to a tool_choice sent without tools, "none"
# too, though its spec calls "none" the default then. Refused here alike: an app that works
# against OpenAI never sends one, and one that does learns it here as it would there.
CHAT_PARAMS = ToolParams()
LEGACY_PARAMS = ToolParams("functions", "function_call")
# Responses: every Response echoes `tool_choice` ("auto" when none was sent) beside its
# `tools`, [] too, so "auto" and "none" without tools are what it says it ran with and are
# taken; "required" or a named function cannot be met and are refused.
RESPONSES_PARAMS = ToolParams(without_tools=("none", "auto"))


def tool_def(tool: ChatTool) -> ToolDef:
    return function_def(tool.function)


def function_def(fn: FunctionDef) -> ToolDef:
    return ToolDef(fn.name, fn.description, fn.parameters or EMPTY_PARAMETERS, fn.strict)


def tools_request(
    tools: Sequence[ToolDef] | None,
    choice: ToolChoice | None,
    parallel: bool | None,
    response_format: ResponseFormat | None = None,
    params: ToolParams = CHAT_PARAMS,
) -> ToolsRequest | None:
    """None when no tools are given; 400s for a choice that names what is not there."""
    tools_param, choice_param = params.tools, params.choice
    if not tools:
        if choice is not None and choice.mode not in params.without_tools:
            msg = (
                f"Invalid value for '{choice_param}': '{choice_param}' is only allowed "
                f"when '{tools_param}' are specified."
            )
            raise bad_request(msg, choice_param)
        return None
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request(f"the names in `{tools_param}` must be unique", tools_param)
    picked = choice or ToolChoice("auto")
    if picked.name is not None and picked.name not in names:
        msg = f"{choice_param} names `{picked.name}`, which is not in `{tools_param}`"
        raise bad_request(msg, choice_param)
    req = ToolsRequest(tuple(tools), picked, parallel is not False)
    if req.active and response_format is not None and response_format.type != "text":
        msg = (
            f"response_format cannot be combined with `{tools_param}` unless "
            f"`{choice_param}` is 'none'"
        )
        raise bad_request(msg, "response_format")
    return req


def chat_tools(body: ChatCompletionRequest) -> ToolsRequest | None:
    """A chat body's tools: `tools` / `tool_choice`, or the legacy `functions` /
    `function_call`; a body mixing the two is a 400 naming the legacy field."""
    if not is_legacy(body):
        check_chat_tools(body)
        return tools_request(
            [tool_def(t) for t in body.tools or ()],
            chat_choice(body.tool_choice),
            body.parallel_tool_calls,
            body.response_format,
        )
    if body.tools is not None or body.tool_choice is not None:
        param = "functions" if body.functions is not None else "function_call"
        msg = f"`{param}` (deprecated) cannot be combined with `tools` or `tool_choice`"
        raise bad_request(msg, param)
    functions = [function_def(f) for f in body.functions or ()]
    choice = named_choice(body.function_call)
    # One call at most: a function_call answer has room for no more.
    return tools_request(functions, choice, False, body.response_format, LEGACY_PARAMS)


def check_chat_tools(body: ChatCompletionRequest) -> None:
    """OpenAI's 400s for chat's tools that Responses take: an empty `tools` (apps that send
    one fail there, and some servers answer it as "no tools", others not) and a
    `parallel_tool_calls` without tools."""
    if body.tools is not None and not body.tools:
        msg = (
            "Invalid 'tools': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead."
        )
        raise bad_request(msg, "tools")
    if not body.tools and body.parallel_tool_calls is not None:
        msg = (
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed "
            "when 'tools' are specified."
        )
        raise bad_request(msg, "parallel_tool_calls")


def is_legacy(body: ChatCompletionRequest) -> bool:
    """The body uses `functions` / `function_call`: the answer speaks that dialect too."""
    return body.functions is not None or body.function_call is not None


def named_choice(choice: str | HasName | None) -> ToolChoice | None:
    """A mode ("none", "auto", "required") or one function by name: the legacy
    function_call's {"name"} and Responses' {"type": "function", "name"}."""
    if choice is None:
        return None
    if isinstance(choice, str):
        return ToolChoice(choice)
    return ToolChoice("function", choice.name)


def chat_choice(choice: str | NamedToolChoice | None) -> ToolChoice | None:
    """Chat's tool_choice: a mode, or {"type": "function", "function": {"name": ...}}."""
    return named_choice(choice.function if isinstance(choice, NamedToolChoice) else choice)


def message_calls(calls: Sequence[ToolCall]) -> list[dict]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def delta_calls(calls: Sequence[CallDelta]) -> list[dict]:
    """OpenAI streams a call as index + id + type + name (arguments "") first, then index +
    argument fragments."""
    out: list[dict] = []
    for c in calls:
        if out and out[-1]["index"] == c.index:  # the same step's pieces of one call, merged
            out[-1]["function"]["arguments"] += c.arguments
        elif c.id is not None:
            fn = {"name": c.name, "arguments": c.arguments}
            out.append({"index": c.index, "id": c.id, "type": "function", "function": fn})
        else:
            out.append({"index": c.index, "function": {"arguments": c.arguments}})
    return out


def message_function_call(calls: Sequence[ToolCall]) -> dict:
    """The legacy answer's one call (the grammar allowed no second)."""
    return {"name": calls[0].name, "arguments": calls[0].arguments}


def delta_function_call(calls: Sequence[CallDelta]) -> dict:
    """The legacy stream's call: {name, arguments ""} first, then argument fragments; one
    step's pieces merged into one delta."""
    out: dict = {}
    for c in calls:
        if c.name is not None:
            out["name"] = c.name
        out["arguments"] = out.get("arguments", "") + c.arguments
    return out
