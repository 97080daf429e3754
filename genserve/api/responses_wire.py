"""OpenAI's Responses API on the wire: the request body, input items <-> runtime messages, and
the Response object with its output items. No generation here (api/responses.py runs it through
runtime.generation, the same path as chat completions)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool

from genserve.api.errors import APIError, bad_request
from genserve.api.logprobs import TokenIds, chat_logprobs
from genserve.api.schemas import (
    FunctionName,
    JsonSchemaFormat,
    OneChoice,
    ResponseFormat,
    SamplingFields,
    StructuredOutputFields,
    WireModel,
)
from genserve.api.tools import EMPTY_PARAMETERS
from genserve.engine.types import TokenLogprob
from genserve.runtime.generation import ChoiceState, Message, TemplateOptions
from genserve.runtime.tokens import TokenText
from genserve.runtime.tools import ToolCall, ToolDef

SYSTEM_ROLES = ("system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")


class TextFormat(WireModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class TextParam(WireModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


class FunctionTool(WireModel):
    model_config = ConfigDict(extra="ignore")

    type: str  # only "function" is served; others are refused by name
    name: FunctionName | None = None
    description: str | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None


class FunctionChoice(WireModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: FunctionName


class ReasoningParam(WireModel):
    """OpenAI's `reasoning`: the effort reaches the chat template (as chat's reasoning_effort
    does); no summary is made here, so `summary` is taken and changes nothing."""

    model_config = ConfigDict(extra="ignore")

    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseInputs(WireModel):
    """What makes a response's prompt (and its output's shape): the fields that
    /v1/responses/input_tokens takes too."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    text: TextParam | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | FunctionChoice | None, OneChoice
    ] = None
    parallel_tool_calls: StrictBool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None  # its id, or {"id": ...}
    reasoning: ReasoningParam | None = None
    # "auto": a prompt past the context drops its oldest turns (OpenAI's truncation strategy)
    truncation: Literal["auto", "disabled"] | None = None

    def template(self) -> TemplateOptions:
        """What the chat template is given beyond the messages: the reasoning effort."""
        effort = self.reasoning.effort if self.reasoning is not None else None
        return TemplateOptions(kwargs={"reasoning_effort": effort} if effort else {})

    def conversation_id(self) -> str | None:
        """The conversation's id, from either of the shapes OpenAI takes; 400 for another."""
        value = self.conversation
        if isinstance(value, dict):
            value = value.get("id")
            if not isinstance(value, str):
                raise bad_request("conversation.id must be a string", "conversation")
        return value

    def format_(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ResponseFormat(type="json_object")
        schema = JsonSchemaFormat(name=fmt.name, schema=fmt.schema_, strict=fmt.strict)
        return ResponseFormat(type="json_schema", json_schema=schema)


class ResponsesRequest(ResponseInputs, SamplingFields, StructuredOutputFields):
    """POST /v1/responses. The shared sampling fields (temperature, top_p, seed and vLLM's
    extensions) come from SamplingFields; `response_format` is set from `text.format`; vLLM's
    structured outputs are taken as on chat (one constraint at most, text.format included)."""

    input: str | list[dict[str, Any]]
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    store: StrictBool | None = True
    metadata: dict[str, str] | None = None
    background: StrictBool | None = None
    include: list[str] | None = None  # of OpenAI's values, only output text logprobs apply
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class InputTokensRequest(ResponseInputs):
    """POST /v1/responses/input_tokens: a Responses body whose prompt is counted, not run.
    OpenAI's schema lets `model` be null; here it names the tokenizer and template, so a
    missing one is a 400."""

    model: str | None = None


# -- ids --------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# -- input items ------------------------------------------------------------------------------
def input_items(value: str | list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """The request's input as stored items (ids given), checked; 400 naming `param` (the
    Conversations API checks its `items` with the same rules)."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not value:
        raise bad_request(f"{param} must not be empty", param)
    return [_item(item, f"{param}[{i}]") for i, item in enumerate(value)]


def _bad(where: str, message: str) -> APIError:
    """A 400 about an item; `where` (`input[2].content`) starts with the field it names."""
    return bad_request(f"{where}{message}", where.partition("[")[0])


def _item(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind == "message":
        return _message_item(item, where)
    if kind == "function_call":
        call_id, name = _text(item, "call_id", where), _text(item, "name", where)
        arguments = _text(item, "arguments", where)
        return {
            "id": _item_id(item, "fc", where), "type": "function_call", "call_id": call_id,
            "name": name, "arguments": arguments, "status": "completed",
        }  # fmt: skip
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            raise _bad(where, ".output must be a string")
        return {
            "id": _item_id(item, "fco", where), "type": "function_call_output",
            "call_id": _text(item, "call_id", where), "output": output, "status": "completed",
        }  # fmt: skip
    if kind == "reasoning":  # an earlier output sent back, as OpenAI asks clients to do
        return _reasoning_item(item, where)
    raise _bad(where, f": input items of type `{kind}` are not supported")


def _reasoning_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A reasoning item as OpenAI's schema has it: summary parts of summary_text, content
    parts of reasoning_text, each with its text (what is kept; not shown to the model)."""
    out: dict[str, Any] = {"id": _item_id(item, "rs", where), "type": "reasoning"}
    for key, part_type in (("summary", "summary_text"), ("content", "reasoning_text")):
        parts = item.get(key, [] if key == "summary" else None)
        if parts is None:
            continue
        if not isinstance(parts, list) or not all(_is_part(p, part_type) for p in parts):
            msg = f"{where}.{key} must be a list of {{'type': '{part_type}', 'text': ...}} parts"
            raise bad_request(msg, "input")
        out[key] = [{"type": part_type, "text": p["text"]} for p in parts]
    return out


def _is_part(part: Any, part_type: str) -> bool:  # noqa: ANN401 - wire JSON
    return (
        isinstance(part, dict)
        and part.get("type") == part_type
        and isinstance(part.get("text"), str)
    )


def _item_id(item: dict[str, Any], prefix: str, where: str) -> str:
    """The client's id for an item (a string, as OpenAI's schema has it: it is listed back as
    `first_id`), or a new one."""
    given = item.get("id")
    if given is None or given == "":
        return new_id(prefix)
    if not isinstance(given, str):
        raise _bad(where, ".id must be a string")
    return given


def _message_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", *SYSTEM_ROLES):
        raise _bad(where, ".role must be user, assistant, system or developer")
    part = "output_text" if role == "assistant" else "input_text"
    text = _content_text(item.get("content"), f"{where}.content")
    content: dict[str, Any] = {"type": part, "text": text}
    if role == "assistant":
        content |= {"annotations": [], "logprobs": []}
    return {
        "id": _item_id(item, "msg", where), "type": "message", "role": role,
        "content": [content], "status": "completed",
    }  # fmt: skip


def _content_text(content: Any, where: str) -> str:  # noqa: ANN401 - wire JSON
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, " must be a string or a list of text parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
            raise _bad(where, ": only text parts are supported")
        text = part.get("text", "")
        if not isinstance(text, str):  # as strict as the typed fields (WireModel): 5 is no text
            raise _bad(where, ": a text part's text must be a string")
        texts.append(text)
    return "".join(texts)


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _bad(where, f".{key} must be a string")
    return value


def messages(instructions: str | None, items: Sequence[dict[str, Any]]) -> tuple[Message, ...]:
    """Items -> chat messages: a function_call joins the assistant turn before it; earlier
    thinking (reasoning items) is not shown again, as reasoning models' templates drop it."""
    out: list[Message] = [Message("system", instructions)] if instructions else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            out.append(Message(item["role"], "".join(p["text"] for p in item["content"])))
        elif kind == "function_call_output":
            out.append(Message("tool", item["output"], tool_call_id=item["call_id"]))
        elif kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            if out and out[-1].role == "assistant":
                last = out.pop()
                out.append(Message("assistant", last.text, (*last.tool_calls, call)))
            else:
                out.append(Message("assistant", "", (call,)))
    return tuple(out)


# -- tools ------------------------------------------------------------------------------------
def tool_defs(tools: Sequence[FunctionTool] | None) -> list[ToolDef]:
    out = []
    for i, t in enumerate(tools or ()):
        if t.type != "function":
            raise bad_request(f"tools[{i}]: tools of type `{t.type}` are not supported", "tools")
        if t.name is None:
            raise bad_request(f"tools[{i}].name is required", "tools")
        out.append(ToolDef(t.name, t.description, t.parameters or EMPTY_PARAMETERS, t.strict))
    return out


def tools_echo(tools: Sequence[FunctionTool] | None) -> list[dict]:
    return [
        {
            "type": "function",
            "name": t.name,
            "description": t.description,
            "parameters": t.parameters or EMPTY_PARAMETERS,
            "strict": t.strict is not False,  # the Responses API's default is strict
        }  # fmt: skip
        for t in tools or ()
    ]


# -- output -----------------------------------------------------------------------------------
def message_item(item_id: str, text: str, status: str, logprobs: Sequence[dict] = ()) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs)}
    return {
        "id": item_id, "type": "message", "role": "assistant", "status": status,
        "content": [part] if status != "in_progress" else [],
    }  # fmt: skip


def call_item(item_id: str, call: ToolCall, status: str) -> dict:
    return {
        "id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
        "arguments": call.arguments, "status": status,
    }  # fmt: skip


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    """A reasoning model's thinking, as OpenAI's Reasoning item carries raw thinking (its
    `content` of reasoning_text; no summary is made here)."""
    content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def output_items(choice: ChoiceState, name: TokenText | TokenIds | None = None) -> list[dict]:
    """A reasoning model's thinking first, then the text (when there is any, or nothing
    else) and each call; the text's token logprobs when asked (`name` names the tokens)."""
    text = "".join(choice.text)
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    out = []
    if thought := "".join(choice.reasoning):
        thought_status = status if not text and not choice.tool_calls else "completed"
        out.append(reasoning_item(new_id("rs"), thought, thought_status))
    if text or not choice.tool_calls:
        lps = logprob_entries(choice.logprobs, name)
        out.append(message_item(new_id("msg"), text, status, lps))
    out += [call_item(new_id("fc"), c, call_status(c)) for c in choice.tool_calls]
    return out


# include's values (OpenAI's Includable); only the text's logprobs mean anything here, the
# others name tools this server does not have.
INCLUDABLE = (
    "message.output_text.logprobs", "code_interpreter_call.outputs",
    "computer_call_output.output.image_url", "file_search_call.results",
    "message.input_image.image_url", "reasoning.encrypted_content",
    "web_search_call.action.sources",
)  # fmt: skip
LOGPROBS = "message.output_text.logprobs"


def wants_logprobs(body: ResponsesRequest) -> int | None:
    """How many top logprobs each output token carries (None: no logprobs); 400 for an
    `include` value OpenAI does not know."""
    for i, value in enumerate(body.include or ()):
        if value not in INCLUDABLE:
            raise bad_request(f"include[{i}]: unknown value {value!r}", "include")
    if LOGPROBS in (body.include or ()):
        return body.top_logprobs or 0
    return None


def logprob_entries(lps: Sequence[TokenLogprob], name: TokenText | TokenIds | None) -> list:
    return chat_logprobs(lps, name)["content"] if name is not None and lps else []


def call_status(call: ToolCall) -> str:
    """A call cut off by max_output_tokens is incomplete; the ones before it are not."""
    try:
        json.loads(call.arguments)
    except ValueError:
        return "incomplete"
    return "completed"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every Response object of one request repeats."""

    id: str
    created_at: int
    model: str
    body: ResponsesRequest


def usage(
    input_tokens: int, output_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0
) -> dict:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def response_object(
    env: Envelope,
    status: str,
    output: list[dict],
    usage_: dict | None = None,
    error: dict | None = None,
) -> dict:
    """OpenAI's Response object; `error` ({code, message}) for a failed one."""
    body = env.body
    incomplete = status == "incomplete"
    obj = {
        "id": env.id,
        "object": "response",
        "created_at": env.created_at,
        "status": status,
        "background": body.background is True,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": env.model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "conversation": _conversation_echo(body),
        "store": body.store is not False,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "text": {"format": _format_echo(body)},
        "tool_choice": _choice_echo(body.tool_choice),
        "tools": tools_echo(body.tools),
        "truncation": body.truncation or "disabled",
        "top_logprobs": body.top_logprobs,
        "metadata": body.metadata or {},
        "reasoning": body.reasoning.model_dump() if body.reasoning is not None else None,
    }
    if usage_ is not None:  # the schema has no null usage: absent until there is one
        obj["usage"] = usage_
    return obj


def _conversation_echo(body: ResponsesRequest) -> dict | None:
    conversation_id = body.conversation_id()  # checked before the response ran
    return None if conversation_id is None else {"id": conversation_id}


def _format_echo(body: ResponsesRequest) -> dict:
    fmt = body.text.format if body.text is not None else None
    if fmt is None:
        return {"type": "text"}
    echo = fmt.model_dump(by_alias=True, exclude_none=True)
    if fmt.type == "json_schema":
        echo.setdefault("name", "response")  # OpenAI's object always names its schema
    return echo


def _choice_echo(choice: str | FunctionChoice | None) -> str | dict:
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else {"type": "function", "name": choice.name}
