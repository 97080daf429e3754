"""The bundled `genserve-starter` model: its files load with the ordinary loading code, give
finite logits, and its tokenizer round-trips text. Nothing here trains or retrains it
(that is scripts/pretrain_starter.py)."""

from __future__ import annotations

import json

import pytest
import torch

from genserve.model.loading import load_model, resolve_model_ref

NAME = "genserve-starter"
REQUIRED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
]
ROUND_TRIP_TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "\tmixed\ttabs  and   spaces\r\nwindows line end\n",
    'print("naïve café — ünïcode ✓ 日本語 🐍")',
    "",
    " leading space and trailing space ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def starter():
    return load_model(NAME, dtype="float32", device="cpu")


def test_bundled_folder_is_complete_and_small() -> None:
    path = resolve_model_ref(NAME)
    assert path.name == NAME
    for name in REQUIRED_FILES:
        assert (path / name).is_file(), name
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True


def test_forward_gives_finite_logits(starter) -> None:
    ids = starter.tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = starter.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], starter.model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(starter, text: str) -> None:
    tok = starter.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(starter) -> None:
    tok = starter.tokenizer
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(token)]
    assert tok.eos_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in starter.eos_token_ids


def test_chat_template_is_chatml(starter) -> None:
    messages = [{"role": "user", "content": "hi"}]
    text = starter.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
