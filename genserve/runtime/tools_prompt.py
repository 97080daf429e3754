"""Messages (with tool calls and tool results) and tools -> what a chat template renders.

A template that knows tools (it mentions `tools` and `tool_calls`, as Qwen's, Llama 3.1's and
Mistral's do) gets them as Hugging Face defines: `tools=` the OpenAI tool objects, assistant
turns with `tool_calls` (arguments as a mapping) and `tool` turns with `tool_call_id`.

Any other template gets the documented fallback, built from the roles every template knows:
the tools and the call syntax are described in the system message, an assistant turn's calls
are written into its text in the family's syntax, and a tool result becomes a user turn
wrapped in <tool_response>...</tool_response> (templates that insist on alternating roles
still render it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from genserve.runtime.tools import (
    ToolsRequest,
    arguments_object,
    fallback_system_prompt,
    render_calls,
    template_knows_tools,
)

if TYPE_CHECKING:
    from genserve.runtime.generation import Message


def template_messages(
    template: str, messages: Sequence[Message], tools: ToolsRequest | None, fmt: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the messages as dicts, extra keyword arguments for apply_chat_template)."""
    # With tool_choice "none" the tools are not shown: nothing invites a call that is refused.
    shown = tools.tools if tools is not None and tools.active else ()
    uses_tools = bool(shown) or any(m.tool_calls or m.role == "tool" for m in messages)
    if not uses_tools:
        return [_plain(m) for m in messages], {}
    if template_knows_tools(template):
        extra = {"tools": [t.template_dict() for t in shown]} if shown else {}
        return [_native(m) for m in messages], extra
    out = [_fallback(m, fmt) for m in messages]
    if shown:
        prompt = fallback_system_prompt(shown, fmt)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _role(m: Message) -> str:
    # Templates know "system"; OpenAI's newer "developer" role means the same to them.
    return "system" if m.role == "developer" else m.role


def _plain(m: Message) -> dict[str, Any]:
    return {"role": _role(m), "content": m.text}


def _native(m: Message) -> dict[str, Any]:
    out = _plain(m)
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": arguments_object(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _fallback(m: Message, fmt: str) -> dict[str, Any]:
    if m.role == "tool":
        body = json.dumps({"tool_call_id": m.tool_call_id, "content": m.text})
        return {"role": "user", "content": f"<tool_response>\n{body}\n</tool_response>"}
    if m.tool_calls:
        calls = render_calls(m.tool_calls, fmt)
        return {"role": "assistant", "content": f"{m.text}\n{calls}" if m.text else calls}
    return _plain(m)
