"""The wire's `tools` and `tool_choice` -> runtime.tools.ToolsRequest, checked once; tool calls
-> OpenAI's JSON (chat's message and delta shapes). Chat completions and Responses share it."""

from __future__ import annotations

from collections.abc import Sequence

from genserve.api.errors import bad_request
from genserve.api.schemas import ChatTool, NamedToolChoice, ResponseFormat
from genserve.runtime.tools import CallDelta, ToolCall, ToolChoice, ToolDef, ToolsRequest

EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_def(tool: ChatTool) -> ToolDef:
    fn = tool.function
    return ToolDef(fn.name, fn.description, fn.parameters or EMPTY_PARAMETERS, fn.strict)


def tools_request(
    tools: Sequence[ToolDef] | None,
    choice: ToolChoice | None,
    parallel: bool | None,
    response_format: ResponseFormat | None = None,
) -> ToolsRequest | None:
    """None when no tools are given; 400s for a choice that names what is not there."""
    if not tools:
        if choice is not None and choice.mode not in ("none", "auto"):
            raise bad_request("`tool_choice` requires `tools`", "tool_choice")
        return None
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    picked = choice or ToolChoice("auto")
    if picked.name is not None and picked.name not in names:
        msg = f"tool_choice names `{picked.name}`, which is not in `tools`"
        raise bad_request(msg, "tool_choice")
    req = ToolsRequest(tuple(tools), picked, parallel is not False)
    if req.active and response_format is not None and response_format.type != "text":
        msg = "response_format cannot be combined with tools unless tool_choice is 'none'"
        raise bad_request(msg, "response_format")
    return req


def chat_choice(choice: str | NamedToolChoice | None) -> ToolChoice | None:
    """Chat's tool_choice: a mode, or {"type": "function", "function": {"name": ...}}."""
    if choice is None:
        return None
    if isinstance(choice, NamedToolChoice):
        return ToolChoice("function", choice.function.name)
    return ToolChoice(choice)


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
