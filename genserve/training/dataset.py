"""Fine-tuning data: JSONL checks with line numbers, and examples -> token ids + loss labels.

Three formats, as OpenAI accepts them: chat (`{"messages": [...]}`, roles system/user/assistant,
string content, at least one assistant message; an assistant message may carry `weight` 0 to
be shown but not learned) and completion (`{"prompt": str, "completion": str}`) train with the
supervised method; preference (`{"input": {"messages": [...]}, "preferred_output": [one
assistant message], "non_preferred_output": [one]}`) trains with DPO. One file uses one format.
Loss is taken on assistant turns / on the completion / on each output only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from genserve.runtime.json_text import is_text

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 5  # line errors named in one message
IGNORE = -100  # label of a token that carries no loss (the convention of HF's loss)
# Bounds that keep checking a file in little memory whatever it holds: a line is read whole
# only up to MAX_LINE_BYTES, and parsed only if it has at most MAX_OPENERS `[` and `{` bytes
# (a 1 MiB line of `[],` parses into ~330k lists, ~22 MiB; an example needs a few dozen).
# Counted as bytes, in C: brackets inside strings count too, which only a line with more than
# 100k of them notices. Parsed lines then cost at most about 12x their size.
MAX_LINE_BYTES = 1 << 20
MAX_OPENERS = 100_000
READ_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    weight: int = 1  # assistant turns only: 0 shows the turn without learning it


@dataclass(frozen=True, slots=True)
class ChatExample:
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class CompletionExample:
    prompt: str
    completion: str


@dataclass(frozen=True, slots=True)
class PreferenceExample:
    """A DPO pair: a conversation and two assistant replies to it, the first preferred."""

    messages: tuple[Message, ...]  # the input: context only, never learned
    preferred: str
    non_preferred: str


Example = ChatExample | CompletionExample | PreferenceExample
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
# Which formats each fine-tuning method trains on (a job's files must hold one of them).
METHOD_FORMATS = {"supervised": ("chat", "completion"), "dpo": ("preference",)}


@dataclass(frozen=True, slots=True)
class LineError:
    line: int  # 1-based, as an editor shows it
    message: str


class DatasetError(ValueError):
    """The file is not fine-tuning data; the message names the first bad lines."""

    def __init__(self, errors: list[LineError], total: int | None = None) -> None:
        self.errors = errors
        parts = [f"line {e.line}: {e.message}" if e.line else e.message for e in errors]
        more = (total or len(errors)) - len(errors)
        tail = f" (and {more} more bad lines)" if more > 0 else ""
        super().__init__("Invalid fine-tuning file: " + "; ".join(parts) + tail)


@dataclass(frozen=True, slots=True)
class Summary:
    examples: int
    format: str  # "chat" | "completion" | "preference"


def _text(where: str, value: str) -> str:
    """A JSON string that is text: a lone surrogate (`\\ud800`) cannot be tokenized."""
    if not is_text(value):
        raise ValueError(f"{where} holds a lone surrogate (an unpaired \\u escape)")
    return value


def _message(i: int, raw: Any, field: str = "messages") -> Message:
    where = f"{field}[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    role, content = raw.get("role"), raw.get("content")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string")
    weight = raw.get("weight", 1)
    if (
        weight not in (0, 1)
        or isinstance(weight, bool)
        or (role != "assistant" and "weight" in raw)
    ):
        raise ValueError(f"{where}.weight must be 0 or 1, and only on assistant messages")
    return Message(role, _text(f"{where}.content", content), int(weight))


def _chat(raw: Any) -> ChatExample:
    if not isinstance(raw, list) or not raw:
        raise ValueError("`messages` must be a non-empty list")
    messages = tuple(_message(i, m) for i, m in enumerate(raw))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("`messages` needs at least one assistant message")
    return ChatExample(messages)


def _output(obj: dict, key: str) -> str:
    """A preference output: OpenAI trains on one assistant reply, the conversation's last."""
    raw = obj.get(key)
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise ValueError(f"`{key}` must be a list of exactly one assistant message")
    role, content = raw[0].get("role"), raw[0].get("content")
    if role != "assistant":
        raise ValueError(f"`{key}[0].role` must be assistant, got {role!r}")
    if not isinstance(content, str) or not content:
        raise ValueError(f"`{key}[0].content` must be a non-empty string")
    return _text(f"`{key}[0].content`", content)


def _preference_input(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, dict):
        raise ValueError("`input` must be an object holding `messages`")
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("`input.messages` must be a non-empty list")
    tools = raw.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError("`input.tools` must be a list")
    if tools:  # the prompt would have to render them as serving does; refused, not dropped
        raise ValueError("`input.tools`: training with tools is not supported; leave it empty")
    if not isinstance(raw.get("parallel_tool_calls", False), bool):
        raise ValueError("`input.parallel_tool_calls` must be true or false")
    return tuple(_message(i, m, "input.messages") for i, m in enumerate(messages))


def _preference(obj: dict) -> PreferenceExample:
    missing = [f"`{k}`" for k in PREFERENCE_KEYS if k not in obj]
    if missing:
        raise ValueError(f"a preference example needs {', '.join(missing)} too")
    messages = _preference_input(obj["input"])
    preferred = _output(obj, "preferred_output")
    non_preferred = _output(obj, "non_preferred_output")
    if preferred == non_preferred:
        raise ValueError("`preferred_output` and `non_preferred_output` are the same reply")
    return PreferenceExample(messages, preferred, non_preferred)


def parse_example(text: str) -> Example:
    """One JSONL line -> an example; ValueError says what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if any(k in obj for k in PREFERENCE_KEYS):
        return _preference(obj)
    if "messages" in obj:
        return _chat(obj["messages"])
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if "prompt" in obj or "completion" in obj:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("`prompt` and `completion` must both be strings")
        if not completion:
            raise ValueError("`completion` must not be empty")
        return CompletionExample(_text("`prompt`", prompt), _text("`completion`", completion))
    raise ValueError(
        "expected `messages` (chat format), `prompt` and `completion`, or `input`, "
        "`preferred_output` and `non_preferred_output` (preference format)"
    )


def _kind(example: Example) -> str:
    if isinstance(example, PreferenceExample):
        return "preference"
    return "chat" if isinstance(example, ChatExample) else "completion"


def method_mismatch(method: str, fmt: str, param: str) -> str | None:
    """Why a file of `fmt` examples cannot train a `method` job; None when it can."""
    if fmt in METHOD_FORMATS[method]:
        return None
    if method == "dpo":
        return (
            f"{param} holds {fmt} examples; a dpo job trains on preference examples "
            '({"input": {"messages": [...]}, "preferred_output": [...], '
            '"non_preferred_output": [...]})'
        )
    return (
        f"{param} holds preference examples, which train with method dpo; a {method} job "
        "needs chat or prompt/completion examples"
    )


def read_format(examples: list[Example]) -> str:
    """The format of a file's examples (read_examples has checked they share one)."""
    return _kind(examples[0])


def bounded_lines(f: BinaryIO, cap: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The lines of f; None for one longer than `cap` bytes, skipped without being held."""
    while line := f.readline(cap + 1):
        if len(line) <= cap or line.endswith(b"\n") and len(line) == cap + 1:
            yield line
            continue
        while (rest := f.readline(READ_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield None


def _line_problem(raw: bytes | None) -> str | None:
    if raw is None:
        return f"longer than {MAX_LINE_BYTES} bytes"
    if raw.count(b"[") + raw.count(b"{") > MAX_OPENERS:
        return f"more than {MAX_OPENERS} `[` and `{{` characters"
    return None


def iter_examples(
    lines: Iterable[bytes | None],
) -> Iterator[tuple[int, Example | None, str | None]]:
    """(line number, example, error) for each non-blank line; mixed formats are errors.
    A line given as None was too long to read (see bounded_lines)."""
    first: str | None = None
    for number, raw in enumerate(lines, start=1):
        if (problem := _line_problem(raw)) is not None:
            yield number, None, problem
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None, "not UTF-8 text"
            continue
        if not text.strip():
            continue
        try:
            example = parse_example(text)
        except ValueError as e:
            yield number, None, str(e)
            continue
        first = first or _kind(example)
        if _kind(example) != first:
            yield number, None, f"a {_kind(example)} example in a file of {first} examples"
            continue
        yield number, example, None


def _collect(lines: Iterable[bytes | None], keep: bool) -> tuple[list[Example], Summary]:
    kept: list[Example] = []
    errors: list[LineError] = []
    count, bad, kind = 0, 0, "chat"
    for number, example, error in iter_examples(lines):
        if error is not None:
            bad += 1
            if len(errors) < MAX_REPORTED:
                errors.append(LineError(number, error))
            continue
        count += 1
        kind = _kind(example) if count == 1 else kind
        if keep:
            kept.append(example)
    if errors:
        raise DatasetError(errors, bad)
    if count == 0:
        raise DatasetError([LineError(0, "the file has no examples (it is empty)")])
    return kept, Summary(count, kind)


def check_file(path: Path) -> Summary:
    """Validate a JSONL file without keeping its examples in memory."""
    with path.open("rb") as f:
        return _collect(bounded_lines(f), keep=False)[1]


def read_examples(path: Path) -> list[Example]:
    with path.open("rb") as f:
        return _collect(bounded_lines(f), keep=True)[0]


# --- tokens and loss labels -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # the token id where loss is taken, IGNORE elsewhere
    truncated: bool = False  # cut to max_len

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def learnable(self) -> bool:
        return self.trained_tokens > 0


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """A preference example as two sequences: the same prompt, each output as its completion."""

    chosen: Encoded
    rejected: Encoded

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def learnable(self) -> bool:
        # DPO compares the two outputs: with either side cut away there is nothing to compare.
        return self.chosen.learnable and self.rejected.learnable


class TemplateError(ValueError):
    """The chat template cannot render these messages turn by turn."""


def _render(tokenizer: Any, template: str, messages: tuple[Message, ...], gen: bool) -> str:
    plain = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            plain, chat_template=template, tokenize=False, add_generation_prompt=gen
        )
    except Exception as e:  # noqa: BLE001 - a template's own error is the data's problem
        raise TemplateError(f"the chat template rejected the messages: {e}") from e


def _prompt(tokenizer: Any, template: str, messages: tuple[Message, ...]) -> str:
    """The text before an assistant turn: the messages so far + the generation prompt."""
    try:
        return _render(tokenizer, template, messages, gen=True)
    except TemplateError:
        if messages:
            raise
        return ""  # some templates refuse an empty conversation: then the turn starts at 0


def chat_segments(tokenizer: Any, template: str, example: ChatExample) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, learned) pieces.

    An assistant turn is what rendering messages[:i+1] adds to rendering messages[:i] with the
    generation prompt: exactly the text the model writes at inference, end-of-turn included.
    """
    messages = example.messages
    full = _render(tokenizer, template, messages, gen=False)
    pieces, cursor = [], 0
    for i, m in enumerate(messages):
        if m.role != "assistant" or not m.weight:
            continue
        prompt = _prompt(tokenizer, template, messages[:i])
        before = _render(tokenizer, template, messages[: i + 1], gen=False)
        start = len(prompt)
        stable = full.startswith(prompt) and full.startswith(before)
        if not stable or not cursor <= start <= len(before):
            raise TemplateError(
                "the chat template does not render conversations prefix by prefix, so assistant "
                "turns cannot be located; use prompt/completion examples"
            )
        pieces += [(full[cursor:start], False), (full[start : len(before)], True)]
        cursor = len(before)
    pieces.append((full[cursor:], False))
    return [(text, learned) for text, learned in pieces if text]


def encode(
    tokenizer: Any, template: str, example: ChatExample | CompletionExample, max_len: int
) -> Encoded:
    """Token ids and labels, cut to max_len tokens. Pieces are tokenized one by one, as the
    server tokenizes a prompt and then appends what the model generates."""
    if isinstance(example, CompletionExample):
        # The completions route encodes prompts with the tokenizer's special tokens (BOS).
        prompt = tokenizer.encode(example.prompt) if example.prompt else []
        answer = tokenizer.encode(example.completion, add_special_tokens=False)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        pieces = [(prompt, False), (answer + eos, True)]
    else:
        pieces = [
            (tokenizer.encode(text, add_special_tokens=False), learned)
            for text, learned in chat_segments(tokenizer, template, example)
        ]
    ids: list[int] = []
    labels: list[int] = []
    for piece, learned in pieces:
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    return Encoded(ids[:max_len], labels[:max_len], len(ids) > max_len)


def encode_pair(
    tokenizer: Any, template: str, example: PreferenceExample, max_len: int
) -> EncodedPair:
    """Each output encoded as the one learned assistant turn after the input conversation (its
    assistant turns shown, not learned), exactly as a supervised chat example is."""
    context = tuple(replace(m, weight=0) if m.role == "assistant" else m for m in example.messages)

    def side(reply: str) -> Encoded:
        chat = ChatExample((*context, Message("assistant", reply)))
        return encode(tokenizer, template, chat, max_len)

    return EncodedPair(side(example.preferred), side(example.non_preferred))


def encode_row(
    tokenizer: Any, template: str, example: Example, max_len: int
) -> Encoded | EncodedPair:
    if isinstance(example, PreferenceExample):
        return encode_pair(tokenizer, template, example, max_len)
    return encode(tokenizer, template, example, max_len)
