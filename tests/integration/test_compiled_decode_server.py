"""`genserve serve --compile-decode`: the server answers while the decode compiles in the
background, /health says when the graph is ready, and one stream decodes through it."""

from pathlib import Path

import httpx
import openai

from tests.server import start_server, wait_until


def compiled_state(url: str) -> str:
    return httpx.get(url + "/health").json()["models"]["tiny-llama"]["compiled_decode"]


def test_the_server_serves_while_compiling_and_says_when_the_graph_is_ready(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = start_server(tiny_model_dir, tmp_path, "--compile-decode", "--max-batch-size", "2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert compiled_state(server.url) in ("compiling", "ready")
        # ignore_eos: a random model may pick EOS greedily on another CPU's kernels
        kw = dict(model="tiny-llama", prompt="hello", max_tokens=8, temperature=0)
        kw["extra_body"] = {"ignore_eos": True}
        early = client.completions.create(**kw)
        assert early.usage.completion_tokens == 8
        wait_until(lambda: compiled_state(server.url) == "ready", timeout=300, every=0.5)
        late = client.completions.create(**kw)
        assert late.usage.completion_tokens == 8 and late.choices[0].finish_reason == "length"
        assert "compiled the lone decode step" in server.log()
        assert "--compile-decode failed" not in server.log()
    finally:
        server.stop()


def test_without_the_flag_health_says_off(server) -> None:  # noqa: ANN001
    assert compiled_state(server.url) == "off"
