"""Fine-tuning data: line-numbered checks, and loss only on what the model should write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genserve.training.dataset import (
    IGNORE,
    ChatExample,
    CompletionExample,
    DatasetError,
    Message,
    TemplateError,
    chat_segments,
    check_file,
    encode,
    read_examples,
)
from tests.tiny_model import CHATML


def chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_chat_and_completion_files_pass(tmp_path: Path) -> None:
    good = chat(("system", "s"), ("user", "hi"), ("assistant", "hello"))
    summary = check_file(write(tmp_path, good, "", good))  # blank lines are skipped
    assert (summary.examples, summary.format) == (2, "chat")
    pc = json.dumps({"prompt": "2+2=", "completion": "4"})
    assert check_file(write(tmp_path, pc)).format == "completion"
    assert read_examples(write(tmp_path, pc)) == [CompletionExample("2+2=", "4")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "each line must be a JSON object"),
        (chat(("robot", "x"), ("assistant", "y")), "messages[0].role must be one of"),
        (chat(("user", "only a question")), "`messages` needs at least one assistant message"),
        ('{"messages": [{"role": "assistant", "content": 3}]}', "messages[0].content must be"),
        ('{"messages": []}', "`messages` must be a non-empty list"),
        ('{"prompt": "p"}', "`prompt` and `completion` must both be strings"),
        ('{"text": "t"}', "expected `messages`"),
    ],
)
def test_bad_lines_are_named(tmp_path: Path, line: str, expected: str) -> None:
    good = chat(("user", "u"), ("assistant", "a"))
    with pytest.raises(DatasetError) as err:
        check_file(write(tmp_path, good, line))
    assert f"line 2: {expected}" in str(err.value)


def test_mixed_formats_empty_files_and_many_errors(tmp_path: Path) -> None:
    pc = json.dumps({"prompt": "p", "completion": "c"})
    with pytest.raises(DatasetError, match=r"line 2: a completion example in a file of chat"):
        check_file(write(tmp_path, chat(("user", "u"), ("assistant", "a")), pc))
    with pytest.raises(DatasetError, match="no examples"):
        check_file(write(tmp_path, "", "  "))
    with pytest.raises(DatasetError) as err:
        check_file(write(tmp_path, *["nope"] * 8))
    assert "line 5:" in str(err.value) and "line 6:" not in str(err.value)
    assert "(and 3 more bad lines)" in str(err.value)


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(chat(("user", "u"), ("assistant", "a")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DatasetError, match="line 2: not UTF-8"):
        check_file(path)


class CharTokenizer:
    """One token per character; apply_chat_template renders ChatML like a real tokenizer."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):  # noqa: ANN001
        from jinja2 import Template

        return Template(chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )


def learned_text(enc) -> str:  # noqa: ANN001
    return "".join(chr(t) for t in enc.labels if t != IGNORE)


def test_chat_loss_covers_assistant_turns_and_their_end_only() -> None:
    example = ChatExample(
        (
            Message("system", "be brief"),
            Message("user", "hi"),
            Message("assistant", "hello"),
            Message("user", "bye"),
            Message("assistant", "ciao", weight=0),
            Message("user", "again"),
            Message("assistant", "later"),
        )
    )
    enc = encode(CharTokenizer(), CHATML, example, max_len=10_000)
    assert len(enc.input_ids) == len(enc.labels)
    # The assistant header is the prompt; content and end-of-turn are learned; weight 0 is not.
    assert learned_text(enc) == "hello<|im_end|>\nlater<|im_end|>\n"
    pieces = chat_segments(CharTokenizer(), CHATML, example)
    rendered = "".join(text for text, _ in pieces)
    assert rendered.endswith("<|im_start|>assistant\nlater<|im_end|>\n")


def test_completion_loss_is_on_the_completion_and_eos() -> None:
    enc = encode(CharTokenizer(), CHATML, CompletionExample("2+2=", "4"), max_len=100)
    assert enc.input_ids == [1, *map(ord, "2+2="), ord("4"), 0]
    assert enc.labels == [IGNORE] * 5 + [ord("4"), 0]
    assert encode(CharTokenizer(), CHATML, CompletionExample("2+2=", "4"), 3).labels == [IGNORE] * 3


def test_template_that_is_not_prefix_stable_is_refused() -> None:
    # Starts with the number of messages: no rendering is a prefix of a longer one.
    odd = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    example = ChatExample((Message("user", "u"), Message("assistant", "a")))
    with pytest.raises(TemplateError, match="prefix by prefix"):
        encode(CharTokenizer(), odd, example, 100)


def test_auto_hyperparameters_follow_the_dataset_size() -> None:
    from genserve.training.manager import describe_exit, resolve_hyperparameters

    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert resolve_hyperparameters(auto, 40) == {
        "n_epochs": 3,
        "batch_size": 1,
        "learning_rate_multiplier": 1.0,
    }
    assert resolve_hyperparameters(auto, 10_000)["batch_size"] == 8
    chosen = resolve_hyperparameters({**auto, "n_epochs": 7, "batch_size": 2}, 10_000)
    assert (chosen["n_epochs"], chosen["batch_size"]) == (7, 2)
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(1) == "exited with status 1"
