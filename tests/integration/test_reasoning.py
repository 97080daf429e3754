"""Reasoning models on a live server with the official client: the thinking (`<think>...`)
comes apart from the answer as vLLM's `reasoning` / `reasoning_content`, streamed or not, with
usage counting its tokens; where the template opens the thinking itself (DeepSeek-R1's), the
output starts inside it; `enable_thinking: false` leaves it all answer; `include_reasoning:
false` leaves it out; a model whose template knows no thinking is untouched. The tiny random
model is held to a text by a Lark grammar (vLLM's structured outputs; `<think>` there names the
tag's own token), which is what makes it think; a grammar that writes the tags holds the
thinking too. A schema (response_format, structured outputs, a forced tool call) waits for the
thinking instead, as vLLM's does: there logit_bias and a frequency penalty make it think."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.server import LiveServer, start_server
from tests.tiny_model import build_tiny_model

TAGS = ("<think>", "</think>")  # one token each, as in Qwen3's and DeepSeek-R1's vocabularies
TURNS = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}"
)
# Qwen3's shape: the model opens the thinking; enable_thinking false closes an empty one.
QWEN3 = TURNS + (
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
# DeepSeek-R1's shape: the generation prompt opens it.
R1 = TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
ASK = [{"role": "user", "content": "Is it?"}]
NO_THINKING = {"enable_thinking": False}


def thinking_server(root: Path, name: str, template: str) -> LiveServer:
    model = build_tiny_model(root / name, chat_template=template, extra_tokens=TAGS)
    logs = root / f"{name}-logs"
    logs.mkdir()
    return start_server(model, logs, "--max-model-len", "256")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = thinking_server(tmp_path_factory.mktemp("qwen3"), "thinker", QWEN3)
    yield srv
    srv.stop()


def client(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


def forced(lark: str, **extra) -> dict:  # noqa: ANN003
    return {"structured_outputs": {"grammar": f"start: {lark}"}, "seed": 1, **extra}


THINKS = r'<think> "\nI think so.\n" </think> "\n\nYes"'


def model_id(srv: LiveServer) -> str:
    return client(srv).models.list().data[0].id


def test_thinking_comes_apart_from_the_answer(qwen3: LiveServer) -> None:
    api, model = client(qwen3), model_id(qwen3)
    r = api.chat.completions.create(
        model=model, messages=ASK, max_tokens=40, logprobs=True,
        extra_body=forced(THINKS),
    )  # fmt: skip
    message = r.choices[0].message.model_dump()
    assert message["content"] == "Yes" and r.choices[0].finish_reason == "stop"
    assert message["reasoning_content"] == message["reasoning"] == "I think so.\n"
    tokens = [t.token for t in r.choices[0].logprobs.content]
    assert r.usage.completion_tokens_details.reasoning_tokens == tokens.index("</think>") + 1
    assert r.usage.completion_tokens == len(tokens)


def test_streamed_thinking_arrives_as_reasoning_deltas(qwen3: LiveServer) -> None:
    api, model = client(qwen3), model_id(qwen3)
    chunks = list(
        api.chat.completions.create(
            model=model, messages=ASK, max_tokens=40, stream=True,
            stream_options={"include_usage": True},
            extra_body=forced(THINKS),
        )
    )  # fmt: skip
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "I think so.\n"
    assert "".join(d.get("reasoning") or "" for d in deltas) == "I think so.\n"
    assert "".join(d.get("content") or "" for d in deltas) == "Yes"
    # The thinking comes before the answer, never inside a content delta.
    first_answer = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert not any(d.get("reasoning") for d in deltas[first_answer:])
    usage = chunks[-1].usage
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens


def test_without_thinking_and_without_showing_it(qwen3: LiveServer) -> None:
    api, model = client(qwen3), model_id(qwen3)
    # enable_thinking false: the template closes an empty thought, so the output is all answer
    # (a tag written in it is the answer's own text).
    plain = api.chat.completions.create(
        model=model, messages=ASK, max_tokens=40,
        extra_body=forced('"Yes " <think> "no" </think>', chat_template_kwargs=NO_THINKING),
    )  # fmt: skip
    assert plain.choices[0].message.content == "Yes <think>no</think>"
    assert plain.choices[0].message.model_dump()["reasoning"] is None
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    hidden = api.chat.completions.create(
        model=model, messages=ASK, max_tokens=40,
        extra_body=forced('<think> "secret" </think> "Yes"', include_reasoning=False),
    )  # fmt: skip
    message = hidden.choices[0].message.model_dump()
    assert message["content"] == "Yes" and message["reasoning"] is None
    assert message["reasoning_content"] is None


def test_earlier_thinking_is_not_sent_back(qwen3: LiveServer) -> None:
    """The template strips an earlier turn's thinking, as Qwen3's does: a conversation that
    carries it back counts the same prompt as one that does not."""
    api, model = client(qwen3), model_id(qwen3)
    turns = [*ASK, {"role": "assistant", "content": "<think>hmm</think>Yes"}, *ASK]
    without = [*ASK, {"role": "assistant", "content": "Yes"}, *ASK]
    counts = [
        api.chat.completions.create(model=model, messages=m, max_tokens=1).usage.prompt_tokens
        for m in (turns, without)
    ]
    assert counts[0] == counts[1]


@pytest.fixture(scope="module")
def r1(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = thinking_server(tmp_path_factory.mktemp("r1"), "r1", R1)
    yield srv
    srv.stop()


def test_a_template_that_opens_the_thinking(r1: LiveServer) -> None:
    api = client(r1)
    r = api.chat.completions.create(
        model=model_id(r1), messages=ASK, max_tokens=40,
        extra_body=forced(r'"Let me see." </think> "\n\nNo"'),
    )  # fmt: skip
    message = r.choices[0].message.model_dump()
    assert message["reasoning"] == "Let me see." and message["content"] == "No"
    cut = api.chat.completions.create(
        model=model_id(r1), messages=ASK, max_tokens=3,
        extra_body=forced(r'"Let me see." </think> "\n\nNo"'),
    )  # fmt: skip
    message = cut.choices[0].message.model_dump()
    assert cut.choices[0].finish_reason == "length"
    assert message["content"] == "" and message["reasoning"]  # all thinking, cut short


def test_a_model_without_thinking_is_untouched(server: LiveServer) -> None:
    body = {
        "model": "tiny-llama", "messages": ASK, "max_tokens": 30,
        "structured_outputs": {"regex": r"<think>a</think>b"},
    }  # fmt: skip
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    message = r["choices"][0]["message"]
    assert message["content"] == "<think>a</think>b"
    assert "reasoning" not in message and "reasoning_content" not in message


def test_responses_carry_the_thinking_as_a_reasoning_item(r1: LiveServer) -> None:
    """/v1/responses: a `reasoning` item (its reasoning_text) before the message, streamed as
    response.reasoning_text events; sent back as input, or continued from, it is accepted.
    The R1-shaped template opens the thinking, so the random model's text starts as thought
    (what follows a </think> it happens to draw is the answer)."""
    api, model = client(r1), model_id(r1)
    r = api.responses.create(model=model, input="Is it?", max_output_tokens=6)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    thought = r.output[0].content[0].text
    assert thought and r.output[0].summary == []
    assert 0 < r.usage.output_tokens_details.reasoning_tokens <= r.usage.output_tokens == 6
    events = list(
        api.responses.create(
            model=model, input="Is it?", max_output_tokens=6, stream=True,
            extra_body={"seed": 3},
        )
    )  # fmt: skip
    types = [e.type for e in events]
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    done = events[-1].response
    assert [item.type for item in done.output] == ["reasoning", "message"]
    assert deltas == done.output[0].content[0].text and deltas
    assert types.index("response.reasoning_text.done") < types.index("response.output_item.done")
    assert 0 < done.usage.output_tokens_details.reasoning_tokens <= 6
    follow = api.responses.create(
        model=model, input="And now?", previous_response_id=r.id, max_output_tokens=2
    )
    sent_back = api.responses.create(
        model=model, max_output_tokens=2,
        input=[{"role": "user", "content": "Is it?"}, r.output[0].model_dump(),
               r.output[1].model_dump(), {"role": "user", "content": "And now?"}],
    )  # fmt: skip
    # The same conversation either way: the earlier thinking is not part of the prompt.
    assert follow.usage.input_tokens == sent_back.usage.input_tokens


def test_reasoning_effort_reaches_the_template(tmp_path: Path) -> None:
    """Chat's reasoning_effort and Responses' reasoning.effort are the template's
    `reasoning_effort` (gpt-oss's template reads it), as vLLM hands it over."""
    template = R1.replace(
        "{% if add_generation_prompt %}",
        "{% if reasoning_effort is defined %}{{ 'effort: ' + reasoning_effort + '\\n' }}{% endif %}"
        "{% if add_generation_prompt %}",
    )
    srv = thinking_server(tmp_path, "effort", template)
    try:
        api, model = client(srv), model_id(srv)

        def chat_prompt(**kw) -> int:  # noqa: ANN003
            r = api.chat.completions.create(model=model, messages=ASK, max_tokens=1, **kw)
            return r.usage.prompt_tokens

        plain, high = chat_prompt(), chat_prompt(reasoning_effort="high")
        assert high > plain
        r = api.responses.create(
            model=model, input="Is it?", max_output_tokens=1, reasoning={"effort": "high"}
        )
        assert r.usage.input_tokens == high and r.reasoning.effort == "high"
        counted = api.responses.input_tokens.count(
            model=model, input="Is it?", reasoning={"effort": "high"}
        )
        assert counted.input_tokens == high
        with pytest.raises(openai.BadRequestError):
            chat_prompt(reasoning_effort="extreme")
    finally:
        srv.stop()


# -- a grammar on the answer waits for the thinking (vLLM's behaviour with a reasoning parser) --
ANSWER = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
JSON_ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}


def token_id(srv: LiveServer, text: str) -> int:
    body = {"model": model_id(srv), "prompt": text, "add_special_tokens": False}
    (tid,) = httpx.post(srv.url + "/tokenize", json=body, timeout=30).json()["tokens"]
    return tid


def thinks_first(srv: LiveServer) -> dict:
    """Greedy sampling that makes the random model think: `x` (which the schema forbids) wins
    until the frequency penalty takes it below `</think>`; where the output may open the
    thinking, `<think>` beats the grammar's `{` at the first token. No grammar spells this."""
    bias = {token_id(srv, "x"): 100, token_id(srv, "</think>"): 90, token_id(srv, "<think>"): 50}
    return {"temperature": 0, "frequency_penalty": 2.0, "logit_bias": bias}


def test_a_json_answer_follows_free_thinking(qwen3: LiveServer) -> None:
    r = client(qwen3).chat.completions.create(
        model=model_id(qwen3), messages=ASK, max_tokens=40, response_format=JSON_ANSWER,
        **thinks_first(qwen3),
    )  # fmt: skip
    message = r.choices[0].message.model_dump()
    # The thinking holds what the schema forbids: the grammar was off while the model thought.
    assert message["reasoning"] and set(message["reasoning"]) == {"x"}
    jsonschema.validate(json.loads(message["content"]), ANSWER)
    assert r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens


def test_a_template_that_opens_the_thinking_streams_it_before_the_json(r1: LiveServer) -> None:
    chunks = list(
        client(r1).chat.completions.create(
            model=model_id(r1), messages=ASK, max_tokens=40, stream=True,
            extra_body={"structured_outputs": {"json": ANSWER}}, **thinks_first(r1),
        )
    )  # fmt: skip
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    thought = "".join(d.get("reasoning") or "" for d in deltas)
    assert thought and set(thought) == {"x"}
    jsonschema.validate(json.loads("".join(d.get("content") or "" for d in deltas)), ANSWER)


def test_cut_while_thinking_there_is_no_answer(r1: LiveServer) -> None:
    r = client(r1).chat.completions.create(
        model=model_id(r1), messages=ASK, max_tokens=3, response_format=JSON_ANSWER,
        **thinks_first(r1),
    )  # fmt: skip
    message = r.choices[0].message.model_dump()
    assert r.choices[0].finish_reason == "length"
    assert message["reasoning"] == "xxx" and not message["content"]


def test_with_thinking_closed_the_grammar_holds_from_the_first_token(qwen3: LiveServer) -> None:
    r = client(qwen3).chat.completions.create(
        model=model_id(qwen3), messages=ASK, max_tokens=40, response_format=JSON_ANSWER,
        extra_body={"chat_template_kwargs": NO_THINKING}, **thinks_first(qwen3),
    )  # fmt: skip
    message = r.choices[0].message.model_dump()
    assert message["reasoning"] is None
    jsonschema.validate(json.loads(message["content"]), ANSWER)


def test_a_forced_tool_call_follows_the_thinking(qwen3: LiveServer) -> None:
    tool = {"type": "function", "function": {"name": "answer", "parameters": ANSWER}}
    r = client(qwen3).chat.completions.create(
        model=model_id(qwen3), messages=ASK, max_tokens=60, tools=[tool],
        tool_choice="required", parallel_tool_calls=False, **thinks_first(qwen3),
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert set(choice.message.model_dump()["reasoning"]) == {"x"}
    (call,) = choice.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), ANSWER)
