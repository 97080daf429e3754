"""The official openai client against a live server with a tiny real model."""

from __future__ import annotations

import openai
import pytest


def test_models_list_and_retrieve(client: openai.OpenAI, model_id: str) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [model_id]
    assert client.models.retrieve(model_id).id == model_id


def test_completion(client: openai.OpenAI, model_id: str) -> None:
    r = client.completions.create(model=model_id, prompt="def add(a, b):", max_tokens=5)
    assert len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert isinstance(msg.content, str)
    assert r.usage.completion_tokens <= 6
    # The details OpenAI always sends, zeros included (clients read them without a check)
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert r.usage.prompt_tokens_details.audio_tokens == 0


def test_max_tokens_reached_gives_length(client: openai.OpenAI, model_id: str) -> None:
    r = client.completions.create(
        model=model_id, prompt="x", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_chat_stream_equals_non_stream(client: openai.OpenAI, model_id: str) -> None:
    kw = dict(
        model=model_id,
        messages=[{"role": "user", "content": "count"}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream(client: openai.OpenAI, model_id: str) -> None:
    kw = dict(model=model_id, prompt="import os", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw, extra_body={"ignore_eos": True})
    stream = client.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].text for c in stream)
    assert text == whole.choices[0].text


def test_n2_returns_two_choices(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        max_tokens=8,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 16


def test_n2_streaming_has_both_indexes(client: openai.OpenAI, model_id: str) -> None:
    stream = client.completions.create(
        model=model_id, prompt="a", n=2, max_tokens=4, stream=True, extra_body={"ignore_eos": True}
    )
    finished = {c.choices[0].index for c in stream if c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_seeded_request_repeats(client: openai.OpenAI, model_id: str) -> None:
    def run(seed: int) -> str:
        r = client.completions.create(
            model=model_id,
            prompt="The answer is",
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text

    first = run(1234)
    assert run(1234) == first
    assert run(4321) != first


def test_stop_string_cuts_exactly(client: openai.OpenAI, model_id: str) -> None:
    kw = dict(model=model_id, prompt="Hello", max_tokens=24, temperature=0)
    full = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    clean = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i : i + 3]]
    assert clean, f"need printable text to pick a stop string from: {full!r}"
    stop = full[clean[0] : clean[0] + 3]
    r = client.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": -1}, "max_tokens"),  # 0 scores a prompt (test_sampling_params)
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_out_of_range_raises_bad_request(
    client: openai.OpenAI, model_id: str, kwargs: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="x", **kwargs)
    assert e.value.param == param
    assert e.value.type == "invalid_request_error"


def test_context_length_exceeded(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="x", max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"


IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


@pytest.mark.parametrize(
    "kwargs,param,words",
    [
        (
            {"messages": [{"role": "user", "content": [IMAGE_PART]}]},
            "messages.[0].content",
            "content parts of type 'image_url' are not supported",
        ),
        ({"modalities": ["text", "audio"]}, "modalities", "only text output is served"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio is not supported"),
        ({"web_search_options": {}}, "web_search_options", "web_search_options is not"),
    ],
)  # fmt: skip
def test_what_is_not_served_is_a_400_saying_so(
    client: openai.OpenAI, model_id: str, kwargs: dict, param: str, words: str
) -> None:
    """Images, audio and web search are refused by name, never dropped in silence."""
    body = {"messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, max_tokens=2, **body)
    assert e.value.param == param and e.value.body["message"].startswith(f"{param}: {words}")


def test_unsupported_feature_is_refused_not_ignored(client: openai.OpenAI, model_id: str) -> None:
    # Function tools are served (tests/integration/test_tools.py); custom tools are not.
    tool = {"type": "custom", "custom": {"name": "f"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "x"}], tools=[tool]
        )
    assert e.value.param.startswith("tools")
