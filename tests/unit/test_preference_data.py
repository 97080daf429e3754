"""Preference (DPO) data: OpenAI's line format checked with line numbers, and each output
encoded as the one learned turn after the same prompt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from genserve.training.dataset import (
    IGNORE,
    DatasetError,
    Message,
    PreferenceExample,
    check_file,
    encode_pair,
    method_mismatch,
    read_examples,
)
from tests.tiny_model import CHATML
from tests.unit.test_dataset import CharTokenizer, learned_text, write


def pair(
    prompt: str = "Is the sky green?",
    preferred: str = "No, it is blue.",
    non_preferred: str = "Yes.",
    **extra: object,
) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": prompt}], **extra},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": non_preferred}],
    }


def line(obj: object) -> str:
    return json.dumps(obj)


def test_openai_preference_lines_pass(tmp_path: Path) -> None:
    # OpenAI's documented example carries an empty tool list and parallel_tool_calls.
    documented = pair(tools=[], parallel_tool_calls=True)
    path = write(tmp_path, line(documented), "", line(pair("2+2?", "4", "5")))
    summary = check_file(path)
    assert (summary.examples, summary.format) == (2, "preference")
    first = read_examples(path)[0]
    assert first == PreferenceExample(
        (Message("user", "Is the sky green?"),), "No, it is blue.", "Yes."
    )


def without(obj: dict, key: str) -> dict:
    return {k: v for k, v in obj.items() if k != key}


def with_output(key: str, value: object) -> dict:
    return {**pair(), key: value}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (without(pair(), "non_preferred_output"), "needs `non_preferred_output` too"),
        ({"input": pair()["input"]}, "needs `preferred_output`, `non_preferred_output` too"),
        ({**pair(), "input": []}, "`input` must be an object holding `messages`"),
        ({**pair(), "input": {"messages": []}}, "`input.messages` must be a non-empty list"),
        (
            {**pair(), "input": {"messages": [{"role": "bot", "content": "x"}]}},
            "input.messages[0].role must be one of",
        ),
        (with_output("preferred_output", {"role": "assistant"}), "must be a list of exactly one"),
        (with_output("preferred_output", []), "must be a list of exactly one"),
        (
            with_output("non_preferred_output", [{"role": "user", "content": "x"}]),
            "`non_preferred_output[0].role` must be assistant",
        ),
        (
            with_output("preferred_output", [{"role": "assistant", "content": ""}]),
            "`preferred_output[0].content` must be a non-empty string",
        ),
        (pair(non_preferred="No, it is blue."), "are the same reply"),
        (pair(tools=[{"type": "function"}]), "training with tools is not supported"),
        (pair(tools={}), "`input.tools` must be a list"),
        (pair(parallel_tool_calls="yes"), "must be true or false"),
    ],
)
def test_bad_preference_lines_are_named(tmp_path: Path, obj: dict, expected: str) -> None:
    with pytest.raises(DatasetError) as err:
        check_file(write(tmp_path, line(pair()), line(obj)))
    assert re.search(rf"line 2: [^;]*{re.escape(expected)}", str(err.value)), str(err.value)


def test_a_file_holds_one_format(tmp_path: Path) -> None:
    chat = line(
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    )
    with pytest.raises(DatasetError, match="line 2: a chat example in a file of preference"):
        check_file(write(tmp_path, line(pair()), chat))
    with pytest.raises(DatasetError, match="line 2: a preference example in a file of chat"):
        check_file(write(tmp_path, chat, line(pair())))


def test_each_method_names_the_format_it_needs() -> None:
    assert method_mismatch("dpo", "preference", "training_file") is None
    assert method_mismatch("supervised", "completion", "training_file") is None
    dpo = method_mismatch("dpo", "chat", "validation_file")
    assert dpo.startswith("validation_file holds chat examples; a dpo job trains on preference")
    supervised = method_mismatch("supervised", "preference", "training_file")
    assert "training_file holds preference examples, which train with method dpo" in supervised


def test_pair_shares_the_prompt_and_learns_only_each_output() -> None:
    example = PreferenceExample(
        (Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye")),
        "ciao",
        "no",
    )
    enc = encode_pair(CharTokenizer(), CHATML, example, max_len=10_000)
    # The context's assistant turn is shown, never learned: only each output and its end.
    assert learned_text(enc.chosen) == "ciao<|im_end|>\n"
    assert learned_text(enc.rejected) == "no<|im_end|>\n"
    start = next(i for i, label in enumerate(enc.chosen.labels) if label != IGNORE)
    assert enc.rejected.input_ids[:start] == enc.chosen.input_ids[:start]  # the same prompt
    assert enc.rejected.labels[:start] == [IGNORE] * start
    assert enc.chosen.learnable and enc.rejected.learnable and not enc.truncated
    # Cut inside the prompt: neither side has a token left to compare.
    short = encode_pair(CharTokenizer(), CHATML, example, max_len=10)
    assert short.truncated and not short.learnable
