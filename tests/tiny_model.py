"""A tiny random-weight Llama with a real byte-level BPE tokenizer, built in about a second."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

# A Llama small enough to build in milliseconds, for tests of the model code itself.
SMALL_LLAMA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=300,
    max_position_embeddings=256,
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    import json as json_mod
    import textwrap

    # Any text does; the standard library's own docstrings are always here.
    return [textwrap.dedent(inspect.getdoc(m) or "") for m in (json_mod, textwrap, inspect, Path)]


def build_tokenizer(
    folder: Path,
    vocab_size: int = 512,
    chat_template: str | None = CHATML,
    extra_tokens: tuple[str, ...] = (),  # whole tokens of their own (a reasoning model's tags)
):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = chat_template
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(
    folder: Path,
    chat_template: str | None = CHATML,
    extra_tokens: tuple[str, ...] = (),
    **overrides,
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, chat_template=chat_template, extra_tokens=extra_tokens)
    cfg = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tok),
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "genserve-test.json").write_text(json.dumps({"built_by": "tests/tiny_model.py"}))
    return folder
