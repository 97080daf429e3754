"""A reasoning model's grammar waits for its thinking (vLLM's behaviour with a reasoning
parser): `reasoning.think_first` decides from the prompt's end, and `ThinkingGate` keeps the
matcher off until the closing tag's token, then starts it on the next one. The tokenizer adds
`<think>`/`</think>` as plain added tokens, as Qwen3's does, which llguidance reads as special."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from genserve.engine.types import GrammarSpec, SamplingParams, ThinkFirst
from genserve.model.grammar import GrammarCompiler, ThinkingGate
from genserve.runtime import reasoning
from tests.tiny_model import build_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
QWEN3_OPEN = "<|im_start|>assistant\n"  # the model decides whether to think
QWEN3_CLOSED = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # enable_thinking false
R1 = "<|im_start|>assistant\n<think>\n"  # the template opened the thinking
JSON = GrammarSpec.json_schema(SCHEMA)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(
        tmp_path_factory.mktemp("think-tok"), extra_tokens=("<think>", "</think>")
    )


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def allowed(gate: ThinkingGate, size: int) -> set[int]:
    row = torch.zeros(size)
    gate.apply(row)
    return set(torch.nonzero(row == 0).flatten().tolist())


def starts(tokenizer, tokens: set[int]) -> set[str]:
    return {tokenizer.decode([t])[:1] for t in tokens}


def test_where_the_grammar_starts_is_read_from_the_prompt() -> None:
    assert reasoning.think_first(R1, JSON, 7, 8) == ThinkFirst(8)
    assert reasoning.think_first(QWEN3_OPEN, JSON, 7, 8) == ThinkFirst(8, 7)
    # As today: thinking closed by the prompt, no grammar, or a closing tag of several tokens.
    assert reasoning.think_first(QWEN3_CLOSED, JSON, 7, 8) is None
    assert reasoning.think_first(R1, None, 7, 8) is None
    assert reasoning.think_first(R1, JSON, 7, None) is None
    # An opening tag of several tokens: the first token cannot be it, so nothing to wait for.
    assert reasoning.think_first(QWEN3_OPEN, JSON, None, 8) is None
    # A caller's own grammar that writes the tags constrains the thinking itself.
    spelled = GrammarSpec.grammar('start: "Hm." </think> "Yes"')
    assert reasoning.think_first(R1, spelled, 7, 8) is None
    assert reasoning.think_first(R1, GrammarSpec.grammar('start: "Yes"'), 7, 8) == ThinkFirst(8)


def test_the_switch_crosses_the_process_boundary() -> None:
    params = SamplingParams(grammar=JSON, think_first=ThinkFirst(8, 7))
    assert pickle.loads(pickle.dumps(params)) == params
    with pytest.raises(ValueError):
        ThinkFirst(-1)


def test_no_mask_while_thinking_then_the_grammar_from_the_next_token(compiler, tokenizer):
    close = tokenizer.convert_tokens_to_ids("</think>")
    size = len(tokenizer)
    gate = ThinkingGate(compiler.matcher(JSON), ThinkFirst(close))
    for token in ids(tokenizer, "not JSON at all: x"):  # the schema forbids every one of these
        assert gate.thinking and len(allowed(gate, size)) == size
        gate.advance(token)
    gate.advance(close)
    assert not gate.thinking and not gate.done
    assert starts(tokenizer, allowed(gate, size)) == {"{"}  # the matcher starts fresh
    for token in ids(tokenizer, json.dumps({"ok": True}, separators=(",", ":"))):
        assert token in allowed(gate, size)
        gate.advance(token)
    assert gate.done


def test_the_first_token_may_open_the_thinking(compiler, tokenizer):
    open_id, close = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    size = len(tokenizer)
    spec = ThinkFirst(close, open_id)
    gate = ThinkingGate(compiler.matcher(JSON), spec)
    first = allowed(gate, size)
    assert not gate.thinking and open_id in first
    assert starts(tokenizer, first - {open_id}) == {"{"}
    gate.advance(open_id)
    assert gate.thinking and len(allowed(gate, size)) == size
    # Or the model answers at once: the grammar took its first token, and holds from there.
    gate = ThinkingGate(compiler.matcher(JSON), spec)
    gate.advance(min(first - {open_id}))
    assert not gate.thinking and open_id not in allowed(gate, size)


def test_llguidance_never_allows_the_added_tags_in_text(compiler, tokenizer):
    """The wrinkle: `<think>` is added, not special, yet llguidance treats it as special, so a
    JSON string may not hold the tag's token. Why the gate keeps the tags from the matcher."""
    open_id, close = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    matcher = compiler.matcher(GrammarSpec.json_schema({"type": "string"}))
    matcher.advance(ids(tokenizer, '"')[0])  # inside a string: any text may come
    bits = matcher.allowed_bits()
    assert not bits[open_id] and not bits[close]
    assert bits[ids(tokenizer, "<")[0]]  # the same text, spelt in characters, is allowed
