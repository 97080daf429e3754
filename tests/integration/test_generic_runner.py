"""A causal LM outside the Llama family is served batched through transformers' own modules
(BatchedHFRunner), and the log says which runner and why."""

from pathlib import Path

import openai
import pytest

from tests.server import start_server
from tests.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tok = build_tokenizer(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=256)
    cfg.eos_token_id = cfg.bos_token_id = tok.eos_token_id
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def test_gpt2_streams_and_repeats_with_seed(gpt2_dir: Path, tmp_path: Path) -> None:
    server = start_server(gpt2_dir, tmp_path, "--max-batch-size", "4")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model="tiny-gpt2", prompt="Hello", max_tokens=8, seed=3, temperature=1.0)
        kw["extra_body"] = {"ignore_eos": True}
        first = client.completions.create(**kw)
        assert first.choices[0].finish_reason == "length"
        assert first.usage.completion_tokens == 8
        assert client.completions.create(**kw).choices[0].text == first.choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        assert streamed == first.choices[0].text
        assert "gpt2: BatchedHFRunner" in server.log()
    finally:
        server.stop()


def test_gpt2_keeps_vllm_s_token_restrictions(gpt2_dir: Path, tmp_path: Path) -> None:
    """allowed_token_ids and bad_words hold on the generic runner too (the sampler is shared),
    with n > 1 and a seed that repeats; prompt_logprobs score the prompt there as well."""
    server = start_server(gpt2_dir, tmp_path, "--max-batch-size", "4")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        allowed = [300, 301, 302]
        extra = {
            "allowed_token_ids": allowed,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        }
        kw = dict(model="tiny-gpt2", prompt="Hello", max_tokens=8, n=2, seed=5, logprobs=0)
        first = client.completions.create(**kw, extra_body=extra)
        ids = [[int(t.split(":")[1]) for t in c.logprobs.tokens] for c in first.choices]
        assert all(len(c) == 8 and set(c) <= set(allowed) for c in ids)
        again = client.completions.create(**kw, extra_body=extra)
        assert [[int(t.split(":")[1]) for t in c.logprobs.tokens] for c in again.choices] == ids
        # "of" is one token of its own: banned, it never comes, though it is allowed.
        word, other = (server_tokens(server, w) for w in ("of", "is"))
        assert len(word) == 1 and len(other) == 1
        banned = {**extra, "allowed_token_ids": [word[0], other[0]], "bad_words": ["of"]}
        out = client.completions.create(**kw, extra_body=banned)
        for c in out.choices:
            assert {int(t.split(":")[1]) for t in c.logprobs.tokens} == {other[0]}
        scored = (
            client.completions.create(
                model="tiny-gpt2",
                prompt="Hello there",
                max_tokens=1,
                extra_body={"prompt_logprobs": 1},
            )
            .choices[0]
            .model_extra["prompt_logprobs"]
        )
        assert scored[0] is None and len(scored) > 1 and all(1 <= len(e) <= 2 for e in scored[1:])
    finally:
        server.stop()


def server_tokens(server, text: str) -> list[int]:  # noqa: ANN001 - a LiveServer
    import httpx

    body = {"model": "tiny-gpt2", "prompt": text, "add_special_tokens": False}
    return httpx.post(server.url + "/tokenize", json=body, timeout=30).json()["tokens"]
