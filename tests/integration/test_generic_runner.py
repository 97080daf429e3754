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
