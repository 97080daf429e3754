"""Tool calls: the grammar that makes them parse, the parser that reads them back, and the
rendering of tools and tool messages into a prompt.

A model family writes its calls in its own syntax. Three are known here, chosen from the chat
template or by `--tool-call-format`:

    hermes       <tool_call>\\n{"name":"f","arguments":{...}}\\n</tool_call>   (Qwen, Hermes)
    llama3_json  {"name":"f","parameters":{...}}, several joined by ";"      (Llama 3.1-3.3)
    mistral      [TOOL_CALLS][{"name":"f","arguments":{...}}, ...]            (Mistral v3)

Structure is guaranteed by llguidance (model/grammar.py compiles the Lark text built here):
with tool_choice "required" or a named function the whole output is a call list; with "auto"
the output is free text until the family's trigger (`<tool_call>`, `[TOOL_CALLS]`, or a `{`
as the first character for llama3_json), and a call list from there: a lazy grammar, as
llama.cpp does. Every call object is `{"name":..., <args key>:...}` with the name first, so the
parser can stream the name before the arguments, and the arguments are the exact substring
the model wrote: streamed fragments always join into the non-streamed value.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genserve.engine.types import COMPACT_JSON, GrammarSpec

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
MISTRAL = "mistral"
FORMATS = (HERMES, LLAMA3_JSON, MISTRAL)


# -- what a request asks for ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ToolDef:
    name: str
    description: str | None
    parameters: Mapping[str, Any]  # a JSON schema (an empty object schema when none given)
    strict: bool | None = None

    def template_dict(self) -> dict:
        """OpenAI's tool object, as chat templates expect it (`tools=`)."""
        fn: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "function"
    name: str | None = None  # the function, for mode "function"

    def __post_init__(self) -> None:
        if self.mode not in ("none", "auto", "required", "function"):
            raise ValueError(f"unknown tool_choice mode {self.mode!r}")
        if (self.mode == "function") != (self.name is not None):
            raise ValueError("a named tool_choice needs a name, and only it")


@dataclass(frozen=True, slots=True)
class ToolsRequest:
    tools: tuple[ToolDef, ...]
    choice: ToolChoice
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Calls may come back (tool_choice is not "none")."""
        return bool(self.tools) and self.choice.mode != "none"

    def callable(self) -> tuple[ToolDef, ...]:
        if self.choice.mode == "function":
            return tuple(t for t in self.tools if t.name == self.choice.name)
        return self.tools


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call, in a request's history or in an answer."""

    id: str
    name: str
    arguments: str  # JSON text, exactly as the model wrote it


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# -- formats ----------------------------------------------------------------------------------
def detect_format(template: str, configured: str = "auto") -> str:
    """The operator's choice, else the family the chat template speaks, else hermes."""
    if configured != "auto":
        return configured
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3_JSON
    return HERMES


def template_knows_tools(template: str) -> bool:
    """Whether the template renders `tools` and tool messages itself (else the fallback)."""
    return "tools" in template and "tool_calls" in template


def args_key(fmt: str) -> str:
    return "parameters" if fmt == LLAMA3_JSON else "arguments"


def call_schema(name: str, arguments: dict, fmt: str) -> dict:
    """One call object: the name first (so it streams first), then the arguments."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, args_key(fmt): arguments},
        "required": ["name", args_key(fmt)],
        "additionalProperties": False,
    }


def calls_schema(tools: Sequence[ToolDef], fmt: str) -> tuple[dict, dict]:
    """The schema of one call to any of `tools`, and the `$defs` the grammar's root must carry.

    Nested under `arguments`, a tool's own refs (`#/$defs/Color`, what pydantic writes for an
    Enum or a nested model) would point at the wrapper's root, where nothing is. A tool whose
    parameters hold local refs therefore moves whole into the root's `$defs` under a key of its
    own, its refs rebased there: two tools' `$defs` of the same name never meet."""
    calls, defs = [], {}
    for i, tool in enumerate(tools):
        params = dict(tool.parameters)
        key = f"tool{i}"
        rebased = _rebase_refs(params, f"#/$defs/{key}")
        if rebased != params:  # it holds a local ref
            defs[key] = rebased
            params = {"$ref": f"#/$defs/{key}"}
        calls.append(call_schema(tool.name, params, fmt))
    return (calls[0] if len(calls) == 1 else {"anyOf": calls}), defs


# Keywords whose values are JSON instances, not schemas: a "$ref" key in them is data.
_INSTANCE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# Keywords whose values map names (which may be any string, "$ref" too) to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def _rebase_refs(node: Any, base: str) -> Any:  # noqa: ANN401 - any part of a JSON schema
    """A copy of a schema whose local refs (`#` and `#/...`) point under `base` instead of the
    root; other refs (anchors, URIs) are left as they are."""
    if isinstance(node, list):
        return [_rebase_refs(n, base) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
            out[k] = base + v[1:]
        elif k in _INSTANCE_KEYWORDS:
            out[k] = v
        elif k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: _rebase_refs(s, base) for name, s in v.items()}
        else:
            out[k] = _rebase_refs(v, base)
    return out


def _json_rule(schema: dict, defs: dict) -> str:
    body = {"x-guidance": COMPACT_JSON, **schema}
    if defs:
        body["$defs"] = defs
    return "%json " + json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def tool_grammar(req: ToolsRequest, fmt: str) -> GrammarSpec:
    """The Lark grammar every output of this request must match (tools active)."""
    call, defs = calls_schema(req.callable(), fmt)
    forced = req.choice.mode != "auto"
    lines = ["%llguidance {}"]
    if fmt == MISTRAL:
        array = {"type": "array", "items": call, "minItems": 1}
        if not req.parallel:
            array["maxItems"] = 1
        body = _json_rule(array, defs)
        lines += (
            [f'start: "[TOOL_CALLS]" {body}']
            if forced
            else [
                f"start: TEXT | trig {body}",
                'trig[lazy]: TEXT "[TOOL_CALLS]"',
            ]
        )
    elif fmt == LLAMA3_JSON:
        more = ' (";" call)*' if req.parallel else ""
        lines += [f"start: calls{' | FREE' if not forced else ''}", f"calls: call{more}"]
        lines += [f"call: {_json_rule(call, defs)}", "FREE: /([^{](.|\\n)*)?/"]
    else:
        more = ' ("\\n" "<tool_call>" body)*' if req.parallel else ""
        first = '"<tool_call>" body' if forced else "trig body"
        lines += [f"start: {first}{more}" + ("" if forced else " | TEXT")]
        lines += [f'body: "\\n" {_json_rule(call, defs)} "\\n</tool_call>"']
        if not forced:
            lines += ['trig[lazy]: TEXT "<tool_call>"']
    if not forced or fmt == LLAMA3_JSON:
        lines += ["TEXT: /(.|\\n)*/"]
    return GrammarSpec.lark_grammar("\n".join(lines))


def trigger(fmt: str) -> str:
    """Where calls begin in free text ("" : only at the very start, llama3_json's `{`)."""
    return {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]"}.get(fmt, "")


# -- parsing ----------------------------------------------------------------------------------
_CALL_HEAD = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)
# How a call object opens: the grammar writes compact JSON, the name first.
_NAME_OPEN = '{"name":"'


@dataclass(frozen=True, slots=True)
class CallDelta:
    """A piece of call `index`: its id and name first (once), then argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    start: int  # where its arguments begin in the call region
    sent: int = 0  # argument characters sent
    done: bool = False


@dataclass(slots=True)
class ToolCallParser:
    """Splits one choice's text, fed piece by piece, into content and call deltas.

    Content is passed on until the trigger; text that may be the trigger's beginning is held
    back until it is known not to be. From the trigger on, the text is a call list the grammar
    made well-formed; each call's arguments are read by bracket matching."""

    fmt: str
    forced: bool  # tool_choice required/named: the whole output is calls
    names: tuple[str, ...] = ()  # the functions it may call (names a call cut in its head)
    text: str = ""
    content_sent: int = 0
    region: int | None = None  # where calls begin, once known
    calls: list[_Call] = field(default_factory=list)

    def feed(self, piece: str) -> tuple[str, list[CallDelta]]:
        self.text += piece
        content = self._content(final=False)
        return content, self._call_deltas() if self.region is not None else []

    def finish(self) -> tuple[str, list[CallDelta]]:
        """What the output's end releases: content still held back (a prefix of the trigger,
        after all), and a call cut before its arguments began (max_tokens): OpenAI answers it
        with its name and empty arguments, as it answers one cut inside them. Without it the
        answer was empty, the call's markup hidden."""
        content = self._content(final=True)
        return content, self._cut_head()

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(c.id, c.name, self._args(c)[0]) for c in self.calls]

    def _content(self, final: bool) -> str:
        if self.region is None:
            self.region = self._find_region()
        end = self.region if self.region is not None else len(self.text)
        if self.region is None and not final:
            end -= _held(self.text, trigger(self.fmt) or "{", self.fmt)
        out = self.text[self.content_sent : max(end, self.content_sent)]
        self.content_sent = max(end, self.content_sent)
        return out

    def _find_region(self) -> int | None:
        if self.forced:
            return 0
        if self.fmt == LLAMA3_JSON:
            return 0 if self.text.startswith("{") else None
        at = self.text.find(trigger(self.fmt))
        return None if at < 0 else at

    def _call_deltas(self) -> list[CallDelta]:
        out = []
        region = self.text[self.region :]
        while True:
            if self.calls and not self.calls[-1].done:
                out += self._more_args(len(self.calls) - 1, region)
                if not self.calls[-1].done:
                    return out
            head = _CALL_HEAD.search(region, self._calls_end())
            if head is None:
                return out
            name = json.loads(f'"{head.group(1)}"')
            self.calls.append(_Call(new_call_id(), name, head.end()))
            out.append(CallDelta(len(self.calls) - 1, self.calls[-1].id, name))

    def _more_args(self, index: int, region: str) -> list[CallDelta]:
        call = self.calls[index]
        args, length, done = _value(region, call.start)
        call.done = done
        fresh = args[call.sent :]
        call.sent = len(args)
        return [CallDelta(index, arguments=fresh)] if fresh else []

    def _cut_head(self) -> list[CallDelta]:
        """The call whose head (markup, `{"name":...`) was begun but not finished, named by
        the one function its written part can still become; none when several can."""
        if self.region is None or (self.calls and not self.calls[-1].done):
            return []
        region = self.text[self.region :]
        brace = region.find("{", self._calls_end())
        if brace < 0 and self.calls:  # after a call, only a `{` commits to another
            return []
        name = _head_name(region[brace:] if brace >= 0 else "", self.names)
        if name is None:
            return []
        self.calls.append(_Call(new_call_id(), name, len(region), done=True))
        return [CallDelta(len(self.calls) - 1, self.calls[-1].id, name)]

    def _calls_end(self) -> int:
        """Where the last call's arguments end in the call region (0 before any call)."""
        return self.calls[-1].start + self._args(self.calls[-1])[1] if self.calls else 0

    def _args(self, call: _Call) -> tuple[str, int]:
        args, length, _ = _value(self.text[self.region or 0 :], call.start)
        return args, length


def _head_name(head: str, names: Sequence[str]) -> str | None:
    """The one name in `names` that a call object's written beginning (`{"name":"get_w`, or
    less) can still become; None if none or several can."""
    written = _written_name(head)
    if written is None:
        return None
    text, closed = written
    # Function names are plain (`^[a-zA-Z0-9_-]{1,64}$`): JSON writes them as they are.
    fits = [n for n in names if (n == text if closed else n.startswith(text))]
    return fits[0] if len(fits) == 1 else None


def _written_name(head: str) -> tuple[str, bool] | None:
    """The name a call object's beginning holds so far and whether its string is closed;
    None: not the beginning of a call object."""
    if len(head) <= len(_NAME_OPEN):
        return ("", False) if _NAME_OPEN.startswith(head) else None
    if not head.startswith(_NAME_OPEN):
        return None
    end = _string_end(head, len(_NAME_OPEN) - 1)
    return (head[len(_NAME_OPEN) : end], True) if end >= 0 else (head[len(_NAME_OPEN) :], False)


def _held(text: str, trig: str, fmt: str) -> int:
    """How many trailing characters could begin the trigger (held back from content)."""
    if fmt == LLAMA3_JSON:  # its calls start at the first character or never
        return 0
    for k in range(min(len(trig), len(text)), 0, -1):
        if trig.startswith(text[-k:]):
            return k
    return 0


def _value(text: str, start: int) -> tuple[str, int, bool]:
    """The JSON value at text[start:] as far as written: (its text, its length, complete).
    The grammar makes it an object (or array): brackets outside strings balance at its end."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = _string_end(text, i)
            if i < 0:
                break
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if depth == 0:
            return text[start : i + 1], i + 1 - start, True
        i += 1
    return text[start:], len(text) - start, False


def _string_end(text: str, i: int) -> int:
    """The index of the quote that closes the string opened at text[i]; -1: not yet written."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j
        j += 1
    return -1


# -- prompts ----------------------------------------------------------------------------------
def fallback_system_prompt(tools: Sequence[ToolDef], fmt: str) -> str:
    """What a template without tool support is given: the tools and how to call them."""
    # Compact: a small model's context is short, and every tool costs prompt tokens.
    listing = "\n".join(
        json.dumps(t.template_dict()["function"], ensure_ascii=False, separators=(",", ":"))
        for t in tools
    )
    example = call_example(fmt, "<name>", "<arguments>")
    return f"You may call these functions:\n{listing}\nTo call one, answer with:\n{example}"


def call_example(fmt: str, name: str, arguments: str) -> str:
    head = f'{{"name":"{name}","{args_key(fmt)}":{arguments}}}'
    if fmt == MISTRAL:
        return f"[TOOL_CALLS][{head}]"
    if fmt == LLAMA3_JSON:
        return head
    return f"<tool_call>\n{head}\n</tool_call>"


def render_calls(calls: Sequence[ToolCall], fmt: str) -> str:
    """An assistant turn's calls as the model would have written them (fallback template)."""
    return "\n".join(call_example(fmt, json.dumps(c.name)[1:-1], c.arguments) for c in calls)


def arguments_object(arguments: str) -> Any:  # noqa: ANN401 - whatever JSON it holds
    """Templates expect arguments as a mapping (they `tojson` it); text that is not JSON
    stays text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
