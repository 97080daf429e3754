"""--stream-interval: a streamed answer's tokens go out every N (the first and the last at
once), through the official client, with the same text, logprobs and usage as the answer sent
whole; an answer that is not streamed comes back whole either way."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from genserve.config import EngineConfig
from tests.server import start_server


def test_a_stream_sends_every_third_token_and_the_same_answer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = start_server(tiny_model_dir, tmp_path, "--stream-interval", "3")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        kw = dict(
            model="tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=10,
            temperature=0.9, seed=11, logprobs=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        whole = client.chat.completions.create(**kw)
        usage = {"include_usage": True}
        chunks = list(client.chat.completions.create(stream=True, stream_options=usage, **kw))
        parts = [c.choices[0] for c in chunks if c.choices]
        text = "".join(p.delta.content or "" for p in parts)
        logprobs = [lp for p in parts if p.logprobs for lp in p.logprobs.content]
        assert text == whole.choices[0].message.content
        want = whole.choices[0].logprobs.content
        assert [lp.token for lp in logprobs] == [lp.token for lp in want]
        assert len(logprobs) == 10 and chunks[-1].usage.completion_tokens == 10
        # tokens 1 | 2-3 | 4-6 | 7-9 | 10: five deltas with tokens, not ten
        assert sum(1 for p in parts if p.logprobs and p.logprobs.content) == 5
        assert parts[-1].finish_reason == "length"
    finally:
        server.stop()


def test_an_interval_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(stream_interval=0)
