"""OpenAI wire models for requests, with OpenAI's bounds.

Unknown fields are ignored, as vLLM does, so newer clients keep working; vLLM's extension
fields (top_k, min_p, ignore_eos, ...) are declared here with their own bounds.

Every request model under api/ is a WireModel, validated in pydantic's strict mode
(tests/unit/test_strict_booleans.py walks them): OpenAI answers 400 for "true" or 1 where a
boolean goes, "2" or 2.0 where an integer goes, "0.5" where a number goes and 7 where a string
goes, all of which pydantic's lax mode took and converted. An integer is taken for a number.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)

from genserve.api.limits import MAX_LOGIT_BIAS, MAX_STOP, MAX_STOP_CHARS
from genserve.runtime.generation import Message
from genserve.runtime.json_text import is_text
from genserve.runtime.tools import ToolCall

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MAX_N = 16
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)
]
# vLLM's choice constraint, as long as the grammar library takes: its parser's rows hold 2,000
# items, so 2,000 options are refused when compiled, and 100k ended in a Rust panic (an
# assertion below 65,536 symbols) quoted in the 400. Refused here first, naming the field.
MAX_CHOICES = 1999
Choices = Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
# vLLM's bad_words: each is tokenized per request (twice), so their number and length are
# bounded; a word of spaces alone has no tokens to ban.
MAX_BAD_WORDS = 1024
BadWords = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=512, pattern=r"\S")]],
    Field(max_length=MAX_BAD_WORDS),
]
# vLLM's allowed_token_ids; empty is a 400, as vLLM's (no token could be drawn).
AllowedIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# OpenAI's Metadata: up to 16 pairs, keys of at most 64 characters, values of at most 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


def check_stop(v: str | list[str] | None) -> str | list[str] | None:
    stops = [v] if isinstance(v, str) else v or []
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"each stop sequence may have at most {MAX_STOP_CHARS} characters")
    return v


def no_lone_surrogate(value: str) -> str:
    """JSON can spell a lone surrogate (`"\\ud800"`); it is no text a tokenizer can read."""
    if not is_text(value):
        raise ValueError("holds a lone surrogate (an unpaired \\u escape)")
    return value


def _texts(value: object) -> None:
    """Every string in a prompt, a content or a stop list, checked by no_lone_surrogate."""
    if isinstance(value, str):
        no_lone_surrogate(value)
    elif isinstance(value, list):
        for item in value:
            _texts(item)


class WireModel(BaseModel):
    """A request body (or a part of one): strict, as OpenAI is about JSON types. Strictness is
    per model in pydantic (a nested model keeps its own mode), so every model of a body derives
    from this one. Query parameters are not bodies: they still parse from a URL's text."""

    model_config = ConfigDict(strict=True)


class StreamOptions(WireModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(WireModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(WireModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(WireModel):
    """vLLM's `structured_outputs`: one constraint on the output (api/structured.py enforces
    it). A key genserve does not know is refused, never ignored: a misspelt constraint would
    otherwise give free text."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict | str | None = Field(default=None, alias="json")  # a schema, or its JSON text
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF/EBNF
    json_object: StrictBool | None = None
    # vLLM's options. Kept: what genserve always does (compact JSON, one backend, no fallback).
    disable_any_whitespace: StrictBool | None = None
    disable_fallback: StrictBool | None = None
    # Refused when set (api/structured.py): genserve cannot do what they ask.
    disable_additional_properties: StrictBool | None = None
    whitespace_pattern: str | None = None
    structural_tag: str | dict | None = None


class StructuredOutputFields(WireModel):
    """vLLM's constraints on the output, in both of its spellings: `structured_outputs` and
    the older top-level `guided_*` fields (chat and completions)."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # refused when set, as whitespace_pattern
    guided_decoding_backend: str | None = None  # ignored: llguidance is the one backend


# chat_template_kwargs that would replace what genserve passes the template (the turns, the
# tools) or change what apply_chat_template returns (token ids, tensors) instead of text.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages", "conversation", "tools", "documents", "chat_template",
        "add_generation_prompt", "continue_final_message", "tokenize", "padding", "truncation",
        "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
        "tokenizer_kwargs", "sanitize_control_tokens",
    }
)  # fmt: skip


class TemplateFields(WireModel):
    """vLLM's chat-template controls (chat and /tokenize)."""

    add_generation_prompt: StrictBool | None = None  # None: true, unless continue_final_message
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the template
    documents: list[dict[str, str]] | None = None  # for templates that render RAG documents
    # OpenAI's; handed to the template as `reasoning_effort` (gpt-oss's reads it), as vLLM
    # does. A template that does not read it ignores it.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(RESERVED_TEMPLATE_KWARGS.intersection(v or {}))
        if taken:
            raise ValueError(f"may not set {', '.join(taken)}: use the request's own fields")
        return v


class SamplingDefaults(WireModel):
    """The sampling fields a model's serving defaults may set (PUT /v1/models/{id}), declared
    once: requests inherit them (SamplingFields)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's extension; -1 and 0: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None  # vLLM's extension
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: the route's default
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # vLLM's, bounded below: a repeated token's positive logit is divided by it, and 1e-300
    # (0 in float32) made infinities, so that no token could be drawn (a 500).
    repetition_penalty: Annotated[float, Field(ge=0.01, le=2.0)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        _texts([v] if isinstance(v, str) else v or [])
        return check_stop(v)


class SamplingFields(SamplingDefaults):
    """Fields that chat and completions share (genserve.api.sampling turns them into the
    engine's SamplingParams)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: LogitBias | None = None
    user: str | None = None
    # vLLM extensions
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    allowed_token_ids: AllowedIds | None = None
    bad_words: BadWords | None = None  # words the output may not spell (their token sequences)
    return_tokens_as_token_ids: StrictBool | None = False
    include_stop_str_in_output: StrictBool | None = False  # the matched stop string ends the text
    skip_special_tokens: StrictBool | None = True  # False: special tokens' text is in the output
    response_format: ResponseFormat | None = None  # OpenAI's on chat; vLLM's on completions

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, v: list[str] | None) -> list[str] | None:
        _texts(v)
        return v


class PromptFields(WireModel):
    """vLLM's prompt controls (chat and completions): keep only the prompt's last N tokens
    (-1: as many as the context holds), so a prompt too long for the model still runs on its
    end; score each prompt token with the k most likely beside it (`prompt_logprobs`, up to
    vLLM's default max_logprobs; a stream cannot carry them, as on vLLM)."""

    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("must be at least 1, or -1 for the model's context")
        return v


class CompletionRequest(SamplingFields, StructuredOutputFields, PromptFields):
    prompt: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[int]]
    # 0 scores a prompt (with echo and logprobs: the prompt's own logprobs), as OpenAI's spec
    # allows here; chat keeps its minimum of 1.
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    echo: StrictBool | None = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):  # noqa: ANN001 - the union above
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        _texts(v)
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        return None if v is None else no_lone_surrogate(v)


class TextPart(WireModel):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDef(WireModel):
    model_config = ConfigDict(extra="ignore")

    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; None: no arguments
    strict: StrictBool | None = None


class ChatTool(WireModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDef


class FunctionRef(WireModel):
    name: FunctionName


class NamedToolChoice(WireModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionRef


ToolChoiceMode = Literal["none", "auto", "required"]


def _one_choice(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    """A choice field (a mode, or an object naming a function) refused with one error naming
    the field: pydantic's error names each member of the union it tried, which made the 400's
    param `function_call.literal['none','auto']`."""
    try:
        return handler(value)
    except ValidationError as e:
        raise ValueError(_choice_error(value, e.errors())) from None


def _choice_error(value: object, errors: list[dict]) -> str:
    """What is wrong with a choice: inside its object form, else which modes there are."""
    if isinstance(value, dict):
        inner = next((err for err in errors if len(err["loc"]) > 1), None)
        if inner is not None:  # loc: (the member's model, its field...)
            return f"{'.'.join(map(str, inner['loc'][1:]))}: {inner['msg']}"
    modes = next((err["ctx"]["expected"] for err in errors if err["type"] == "literal_error"), "")
    shown = f"value {value!r}" if isinstance(value, str) else f"type ({type(value).__name__})"
    return f"invalid {shown}: expected {modes}, or an object naming a function"


# A choice field: its errors name the field alone (see `_one_choice`).
OneChoice = WrapValidator(_one_choice)


class CalledFunction(WireModel):
    name: str
    arguments: str


class ChatToolCall(WireModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(WireModel):
    model_config = ConfigDict(extra="ignore")

    # "function": the deprecated turn that answers a `function_call` (it names the function)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    function_call: CalledFunction | None = None  # a deprecated assistant turn's one call

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: object) -> object:
        """A part that is not text (an image, audio, a file) is refused by its type: checked
        against the text part alone, it read "Input should be a valid string"."""
        for part in v if isinstance(v, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported: text only")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        _texts(v if isinstance(v, str) else [p.text for p in v or []])
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def plain_messages(messages: list[ChatMessage]) -> tuple[Message, ...]:
    """The wire's turns as the runtime's. A deprecated `function_call` is a tool call, and the
    `function` turn after it that call's result: both get the id the wire never gave them."""
    out, call_id = [], None
    for i, m in enumerate(messages):
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()]
        if m.function_call is not None:
            call_id = legacy_call_id(i)
            calls.append(ToolCall(call_id, m.function_call.name, m.function_call.arguments))
        if m.role == "function":
            out.append(Message("tool", m.text(), tool_call_id=call_id or legacy_call_id(i)))
            continue
        out.append(Message(m.role, m.text(), tuple(calls), m.tool_call_id))
    return tuple(out)


def legacy_call_id(index: int) -> str:
    """A deprecated call's id, from its turn's place: the same history renders the same prompt
    (the prefix cache), and nine alphanumerics is what Mistral's templates insist on."""
    return f"fn{index:07d}"


class ChatCompletionRequest(SamplingFields, StructuredOutputFields, TemplateFields, PromptFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Annotated[ToolChoiceMode | NamedToolChoice | None, OneChoice] = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM's: false leaves a reasoning model's thinking out of the answer (it is still
    # generated, and still kept apart from the content).
    include_reasoning: StrictBool = True
    # Stored chat completions (api/stored_completions.py): kept for listing, and as data.
    store: StrictBool | None = None
    metadata: Metadata | None = None
    # Deprecated in favor of tools / tool_choice, still served (api/tools.py::chat_tools).
    functions: Annotated[list[FunctionDef], Field(min_length=1, max_length=128)] | None = None
    function_call: Annotated[Literal["none", "auto"] | FunctionRef | None, OneChoice] = None
    # OpenAI's, for what this server does not do: refused (400) rather than ignored, so an app
    # that depends on them learns at once (text-only output, no audio, no web search).
    modalities: list[str] | None = None
    audio: dict | None = None
    web_search_options: dict | None = None

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(m != "text" for m in v):
            raise ValueError("only text output is served: modalities may hold 'text' alone")
        return v

    @field_validator("audio", "web_search_options")
    @classmethod
    def _unsupported(cls, v: dict | None, info: ValidationInfo) -> None:
        if v is not None:
            raise ValueError(f"{info.field_name} is not supported by this server")


class ModelSettingsBody(WireModel):
    """PUT /v1/models/{id} (all of it) and PATCH (what it names)."""

    model_config = ConfigDict(extra="forbid")

    defaults: SamplingDefaults | None = None
    chat_template: str | None = None
    aliases: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = None
    max_context: Annotated[int, Field(ge=16)] | None = None


class RegisterModelRequest(WireModel):
    """POST /v1/models: load a model from a ref, under an id."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512)]  # the ref
    id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\w.:/-]+$")] | None = None
    # None: from the folder (a peft adapter_config.json is a LoRA adapter; else config.json's
    # architectures)
    kind: Literal["generate", "embed", "lora"] | None = None
    settings: ModelSettingsBody | None = None
    base: Annotated[str, Field(min_length=1, max_length=128)] | None = None  # a LoRA's model
