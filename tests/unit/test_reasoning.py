"""runtime/reasoning.py: a reasoning model's thinking split from its answer, the same however
the text arrives in pieces (every cut of every case), with where it starts read from the prompt."""

from __future__ import annotations

import pytest

from genserve.runtime.reasoning import ReasoningSplitter, active, split

MODEL_OPENS = "<|im_start|>assistant\n"  # Qwen3: the model writes <think> itself
PROMPT_OPENS = "<|im_start|>assistant\n<think>\n"  # DeepSeek-R1: the template opens it
CASES = [
    ("<think>\nabc def\n</think>\n\nHello world", MODEL_OPENS, "abc def\n", "Hello world"),
    ("abc</think>\n\nHi", PROMPT_OPENS, "abc", "Hi"),
    ("<think>abc</think>Hi", PROMPT_OPENS, "abc", "Hi"),  # the tag written again: dropped
    (" Hello", MODEL_OPENS, "", " Hello"),  # no thinking: the answer keeps its whitespace
    ("Hello <think> x </think> y", MODEL_OPENS, "", "Hello <think> x </think> y"),
    ("<think>never closes", MODEL_OPENS, "never closes", ""),  # cut by max_tokens: all thought
    ("never closes", PROMPT_OPENS, "never closes", ""),
    ("<thi", MODEL_OPENS, "", "<thi"),  # an answer that only looked like a tag
    ("<think>x</thi", MODEL_OPENS, "x</thi", ""),
    ("<think>\n</think>\nA", MODEL_OPENS, "", "A"),  # an empty thought
    ("<think>a</think>b</think>c", MODEL_OPENS, "a", "b</think>c"),  # the first close counts
    ("<think>a</think><tool_call>{}", MODEL_OPENS, "a", "<tool_call>{}"),
]


@pytest.mark.parametrize("text,tail,thought,answer", CASES)
def test_every_cut_gives_the_whole_answer_split(
    text: str, tail: str, thought: str, answer: str
) -> None:
    assert split(text, tail) == (thought, answer)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            s = ReasoningSplitter.for_prompt(tail)
            pieces = [s.feed(text[:i]), s.feed(text[i:j]), s.feed(text[j:]), s.finish()]
            got = ("".join(p[0] for p in pieces), "".join(p[1] for p in pieces))
            assert got == (thought, answer), (i, j)


def test_which_models_are_split() -> None:
    qwen3 = "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    assert active(qwen3, "auto") and not active("{{ messages }}", "auto")
    assert not active(qwen3, "none") and active("{{ messages }}", "think")
    assert active(None, "deepseek_r1") and active(None, "qwen3") and not active(None, "auto")


def test_a_piece_is_released_as_soon_as_it_cannot_be_a_tag() -> None:
    s = ReasoningSplitter.for_prompt(MODEL_OPENS)
    assert s.feed("<th") == ("", "")  # may still become <think>
    assert s.feed("ink>I wonder") == ("I wonder", "")
    assert s.feed(" if </th") == (" if ", "")  # may still become </think>
    assert s.feed("ey") == ("</they", "")
    assert s.feed("</think>\n\nYes") == ("", "Yes")
    assert s.finish() == ("", "")


def test_tool_calls_are_read_from_the_answer_alone_and_thinking_tokens_counted() -> None:
    """generate()'s per-choice text: a call written while thinking is thought, not a call;
    the one after the thinking is; the thinking's tokens end at the closing tag's."""
    from genserve.engine.types import FinishReason, TokenDelta
    from genserve.runtime.generation import ChoiceText, Thinking
    from genserve.runtime.tools import HERMES, ToolCallParser

    close = 99
    call = '<tool_call>{"name":"f","arguments":{}}</tool_call>'
    pieces = [  # (token ids, text) as the engine would publish them
        ((1, 2), "<think>maybe " + call),
        ((3, close, 4), " no</think>"),
        ((5, 6, 7), call),
    ]
    text = ChoiceText(Thinking(MODEL_OPENS, close).splitter(), ToolCallParser(HERMES, False), close)
    deltas = []
    for k, (ids, piece) in enumerate(pieces):
        last = k == len(pieces) - 1
        d = TokenDelta("r", ids, piece, FinishReason.STOP if last else None, 3, 0)
        deltas.append(text.delta(0, "stop" if last else None, d))
    assert "".join(d.reasoning for d in deltas) == "maybe " + call + " no"
    assert "".join(d.text for d in deltas) == ""
    calls = [c for d in deltas for c in d.calls]
    assert [c.name for c in calls if c.name] == ["f"] and deltas[-1].finish_reason == "tool_calls"
    assert [d.reasoning_tokens for d in deltas] == [2, 4, 4]  # up to the closing tag, included
