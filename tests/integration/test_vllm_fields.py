"""vLLM's extra request fields on a live server, sent as vLLM's users send them: the official
openai client's `extra_body`. Structured outputs in both spellings constrain a random-weight
model (it could only match a regex or a choice through the grammar); the chat-template controls
change the prompt exactly as rendering it by hand does; include_stop_str_in_output and
skip_special_tokens change the text as vLLM's do. Before these were served, every one of them
was silently ignored."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pytest

from tests.server import LiveServer, start_server
from tests.tiny_model import build_tiny_model

MODEL = "tiny-llama"
# ChatML plus what real templates do with chat_template_kwargs (Qwen3's enable_thinking) and
# documents (Command R's, Granite's).
TEMPLATE = (
    "{% if documents %}{{ '<|im_start|>system\nDocuments:\n' }}"
    "{% for d in documents %}{{ d['title'] + ': ' + d['text'] + '\n' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking %}{{ '<think>\n' }}{% endif %}{% endif %}"
)
USER = [{"role": "user", "content": "Tell me a story."}]
RENDERED_USER = "<|im_start|>user\nTell me a story.<|im_end|>\n"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CHOICES = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    model = build_tiny_model(tmp_path_factory.mktemp("vllm-model") / MODEL, TEMPLATE)
    live = start_server(model, tmp_path_factory.mktemp("vllm-logs"), "--max-batch-size", "8")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def chat(
    client: openai.OpenAI,
    messages: list[dict] | None = None,
    max_tokens: int = 40,
    seed: int = 7,
    **extra: object,
):  # noqa: ANN201
    """A chat call whose vLLM fields travel in extra_body, as a vLLM user sends them."""
    return client.chat.completions.create(
        model=MODEL, messages=messages or USER, max_tokens=max_tokens, seed=seed,
        extra_body=extra,
    )  # fmt: skip


def chat_text(client: openai.OpenAI, messages: list[dict] | None = None, **extra) -> str:  # noqa: ANN003
    return chat(client, messages, **extra).choices[0].message.content


def complete(client: openai.OpenAI, prompt: str, max_tokens: int = 40, **extra: object):  # noqa: ANN201
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=7, extra_body=extra
    )


# -- structured outputs -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [{"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}],
)
def test_a_choice_is_always_one_of_the_options(client: openai.OpenAI, extra: dict) -> None:
    seen = set()
    for seed in range(12):
        r = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=20, seed=seed, temperature=1.0,
            extra_body=extra,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        seen.add(r.choices[0].message.content)
    assert seen <= set(CHOICES) and len(seen) > 1, seen


def test_a_streamed_choice_is_one_of_the_options(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=20, seed=3, stream=True,
        extra_body={"guided_choice": CHOICES},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text in CHOICES


PATTERN = r"[a-z]{3,6}-[0-9]{2,4}"


@pytest.mark.parametrize(
    "extra", [{"guided_regex": PATTERN}, {"structured_outputs": {"regex": PATTERN}}]
)
def test_a_regex_matches_the_whole_output_on_both_routes(
    client: openai.OpenAI, extra: dict
) -> None:
    for seed in range(5):
        text = chat_text(client, seed=seed, **extra)
        assert re.fullmatch(PATTERN, text), text
        r = client.completions.create(
            model=MODEL, prompt="id:", max_tokens=20, seed=seed, extra_body=extra
        )
        assert re.fullmatch(PATTERN, r.choices[0].text), r.choices[0].text


@pytest.mark.parametrize(
    "extra",
    [
        {"guided_json": SCHEMA},
        {"guided_json": json.dumps(SCHEMA)},  # vLLM takes the schema's JSON text too
        {"structured_outputs": {"json": SCHEMA}},
    ],
)
def test_a_json_schema_is_enforced(client: openai.OpenAI, extra: dict) -> None:
    r = chat(client, max_completion_tokens=200, **extra)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = complete(client, "{", 200, **extra)
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_json_object_gives_an_object(client: openai.OpenAI) -> None:
    finished = 0
    for seed in range(6):  # free-form JSON from a random model may run past max_tokens
        r = chat(client, max_tokens=300, seed=seed, structured_outputs={"json_object": True})
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{")
        if reason == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict)
    assert finished


@pytest.mark.parametrize(
    "grammar",
    [
        'start: NUM "+" NUM "=" NUM\nNUM: /[0-9]{1,2}/',  # Lark
        'root ::= num "+" num "=" num\nnum ::= [0-9] | [0-9] [0-9]',  # GBNF (vLLM's xgrammar)
    ],
)
def test_a_grammar_in_lark_or_gbnf_is_enforced(client: openai.OpenAI, grammar: str) -> None:
    for extra in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        text = chat_text(client, **extra)
        assert re.fullmatch(r"[0-9]{1,2}\+[0-9]{1,2}=[0-9]{1,2}", text), text


def test_seeded_constrained_output_repeats(client: openai.OpenAI) -> None:
    def run() -> str:
        return chat_text(client, max_tokens=200, temperature=1.0, guided_json=SCHEMA)

    assert run() == run()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "a"}, "guided_regex"),
        ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar"),
        ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"jsn": SCHEMA}}, "structured_outputs.jsn"),
        (
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(
    srv: LiveServer, client: openai.OpenAI, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **extra)
    assert e.value.param == param, e.value.message
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, **extra}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_schema_error_names_the_field_it_came_from(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, structured_outputs={"json": {"type": "array", "uniqueItems": True}})
    assert "structured_outputs.json schema keyword 'uniqueItems'" in e.value.message


def test_a_constraint_with_active_tools_is_a_400(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=USER, tools=tools, extra_body={"guided_choice": CHOICES}
        )
    assert e.value.param == "guided_choice"
    r = client.chat.completions.create(  # tool_choice none: the tools constrain nothing
        model=MODEL, messages=USER, tools=tools, tool_choice="none", max_tokens=20, seed=1,
        extra_body={"guided_choice": CHOICES},
    )  # fmt: skip
    assert r.choices[0].message.content in CHOICES


def test_a_batch_runs_constrained_lines_and_reports_bad_ones(client: openai.OpenAI) -> None:
    def line(i: int, **extra: object) -> dict:
        body = {"model": MODEL, "messages": USER, "max_tokens": 20, "seed": i, **extra}
        return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}

    lines = [line(0, guided_choice=CHOICES), line(1, structured_outputs={"regex": PATTERN})]
    lines.append(line(2, guided_regex="(unclosed"))
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 240
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    texts = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"] for x in out}
    assert texts["r0"] in CHOICES and re.fullmatch(PATTERN, texts["r1"]), texts
    errors = client.files.content(batch.error_file_id).text.splitlines()
    (error,) = [json.loads(x) for x in errors]
    assert error["custom_id"] == "r2" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "guided_regex"


# -- chat template controls -------------------------------------------------------------------
def test_add_generation_prompt_false_renders_no_assistant_header(client: openai.OpenAI) -> None:
    r = chat(client, add_generation_prompt=False)
    plain = complete(client, RENDERED_USER)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert r.choices[0].message.content == plain.choices[0].text
    assert r.usage.prompt_tokens < chat(client).usage.prompt_tokens


def test_continue_final_message_continues_the_assistant_s_turn(
    srv: LiveServer, client: openai.OpenAI
) -> None:
    turns = [*USER, {"role": "assistant", "content": "Once upon a"}]
    r = chat(client, turns, continue_final_message=True, add_generation_prompt=False)
    by_hand = complete(client, RENDERED_USER + "<|im_start|>assistant\nOnce upon a")
    assert r.choices[0].message.content == by_hand.choices[0].text
    assert r.usage.prompt_tokens == by_hand.usage.prompt_tokens
    # add_generation_prompt left out is false here (it cannot hold with continuing).
    assert chat_text(client, turns, continue_final_message=True) == by_hand.choices[0].text
    # /tokenize renders it the same way.
    body = {"model": MODEL, "messages": turns, "continue_final_message": True}
    count = httpx.post(srv.url + "/tokenize", json=body, timeout=30).json()["count"]
    assert count == r.usage.prompt_tokens


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (
            [*USER, {"role": "assistant", "content": "x"}],
            {"continue_final_message": True, "add_generation_prompt": True},
            "continue_final_message",
        ),
        (USER, {"continue_final_message": True}, "messages"),
        (USER, {"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ],
)
def test_template_controls_that_cannot_hold_are_400s(
    client: openai.OpenAI, messages: list[dict], extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages, **extra)
    assert e.value.param == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_json": [1]}, "guided_json"),
        ({"structured_outputs": {"json": 5}}, "structured_outputs.json"),
    ],
)
def test_a_wrong_type_for_a_schema_names_the_field(
    client: openai.OpenAI, extra: dict, param: str
) -> None:
    """A schema is an object or its JSON text: the 400 names the field, not the union member
    pydantic tried ("guided_json.dict[any,any]" before)."""
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **extra)
    assert e.value.param == param


def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI) -> None:
    r = chat(client, chat_template_kwargs={"enable_thinking": True})
    by_hand = complete(client, RENDERED_USER + "<|im_start|>assistant\n<think>\n")
    assert r.choices[0].message.content == by_hand.choices[0].text
    assert r.usage.prompt_tokens == by_hand.usage.prompt_tokens > chat(client).usage.prompt_tokens


def test_documents_reach_the_template(client: openai.OpenAI) -> None:
    docs = [{"title": "Tides", "text": "The moon pulls."}, {"title": "Sun", "text": "Hot."}]
    r = chat(client, documents=docs)
    system = "<|im_start|>system\nDocuments:\nTides: The moon pulls.\nSun: Hot.\n<|im_end|>\n"
    by_hand = complete(client, system + RENDERED_USER + "<|im_start|>assistant\n")
    assert r.choices[0].message.content == by_hand.choices[0].text
    assert r.usage.prompt_tokens == by_hand.usage.prompt_tokens


# -- detokenizing -----------------------------------------------------------------------------
def test_include_stop_str_in_output_keeps_the_stop_string(client: openai.OpenAI) -> None:
    whole = complete(client, "Once", 30, ignore_eos=True).choices[0].text
    stop = plain_piece(whole)
    cut = whole.index(stop)
    plain = complete(client, "Once", 30, ignore_eos=True, stop=[stop]).choices[0]
    kept = complete(
        client, "Once", 30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    ).choices[0]
    assert (plain.text, plain.finish_reason) == (whole[:cut], "stop")
    assert (kept.text, kept.finish_reason) == (whole[: cut + len(stop)], "stop")
    stream = client.completions.create(
        model=MODEL, prompt="Once", max_tokens=30, seed=7, stream=True, stop=[stop],
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) == kept.text


def plain_piece(text: str) -> str:
    """Three printable ASCII characters from the second half of a random model's text (it
    may hold U+FFFD and control characters elsewhere), to stop on."""
    for i in range(len(text) // 2, len(text) - 2):
        piece = text[i : i + 3]
        if piece.isascii() and piece.isprintable() and piece.strip() and text.index(piece):
            return piece
    raise AssertionError(f"no plain piece in {text!r}")


def token_of(srv: LiveServer, text: str) -> tuple[int, str]:
    """The first token of `text`, and its own text."""
    body = {"model": MODEL, "prompt": text, "add_special_tokens": False}
    token = httpx.post(srv.url + "/tokenize", json=body, timeout=30).json()["tokens"][0]
    body = {"model": MODEL, "tokens": [token]}
    return token, httpx.post(srv.url + "/detokenize", json=body, timeout=30).json()["prompt"]


def test_include_stop_str_in_output_keeps_a_stop_token_s_text(
    srv: LiveServer, client: openai.OpenAI
) -> None:
    token, text = token_of(srv, "the")
    forced = {"logit_bias": {str(token): 100}, "stop_token_ids": [token]}
    plain = complete(client, "Once", 10, **forced).choices[0]
    kept = complete(client, "Once", 10, include_stop_str_in_output=True, **forced).choices[0]
    assert (plain.text, plain.finish_reason) == ("", "stop")
    assert (kept.text, kept.finish_reason) == (text, "stop") and text


def test_skip_special_tokens_false_shows_special_tokens(
    srv: LiveServer, client: openai.OpenAI
) -> None:
    start, _ = token_of(srv, "<|im_start|>")
    forced = {"logit_bias": {str(start): 100}}
    assert complete(client, "Once", 3, **forced).choices[0].text == ""
    shown = complete(client, "Once", 3, skip_special_tokens=False, **forced).choices[0].text
    assert shown == "<|im_start|>" * 3
    text = chat_text(client, max_tokens=3, skip_special_tokens=False, **forced)
    assert text == "<|im_start|>" * 3


def test_responses_take_structured_outputs_as_chat_does(client: openai.OpenAI) -> None:
    """/v1/responses took vLLM's fields and ignored them (random text came back); they hold
    its output as on chat, and one of them beside text.format is a 400 naming it."""
    model = client.models.list().data[0].id
    for extra in ({"structured_outputs": {"choice": ["red", "blue"]}},
                  {"guided_regex": "(red|blue)"}):  # fmt: skip
        r = client.responses.create(
            model=model, input="A colour?", max_output_tokens=8, extra_body=extra
        )
        assert r.output_text in ("red", "blue")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=model, input="x", max_output_tokens=8, text={"format": {"type": "json_object"}},
            extra_body={"guided_regex": "a"},
        )  # fmt: skip
    assert caught.value.body["param"] == "guided_regex"


def test_truncate_prompt_tokens_keeps_the_prompt_s_end(
    client: openai.OpenAI, srv: LiveServer
) -> None:
    """vLLM's truncate_prompt_tokens: only the prompt's last N tokens run (usage counts them,
    echo shows them); on chat too; 0 or below -1 is a 400."""
    model = client.models.list().data[0].id
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    tokens = httpx.post(srv.url + "/tokenize", json={"model": model, "prompt": prompt}).json()
    tail = httpx.post(
        srv.url + "/detokenize", json={"model": model, "tokens": tokens["tokens"][-5:]}
    ).json()["prompt"]
    cut = client.completions.create(
        model=model, prompt=prompt, max_tokens=1, echo=True,
        extra_body={"truncate_prompt_tokens": 5},
    )  # fmt: skip
    assert tokens["count"] > 5 and cut.usage.prompt_tokens == 5
    assert prompt.endswith(tail) and cut.choices[0].text.startswith(tail)  # the end runs
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=1,
        extra_body={"truncate_prompt_tokens": 4},
    )  # fmt: skip
    assert chat.usage.prompt_tokens == 4
    for bad in (0, -2):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(
                model=model, prompt="x", max_tokens=1, extra_body={"truncate_prompt_tokens": bad}
            )
        assert caught.value.body["param"] == "truncate_prompt_tokens"


# -- allowed_token_ids, bad_words, prompt_logprobs ---------------------------------------------
ALLOWED = [300, 301, 302]  # ordinary merges of the tiny tokenizer (no special token)


def drawn_ids(choice) -> list[int]:  # noqa: ANN001 - a completions choice
    """The choice's token ids, read from return_tokens_as_token_ids' names."""
    return [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens]


def test_allowed_token_ids_hold_every_choice_and_a_seed_repeats(client: openai.OpenAI) -> None:
    """Before, allowed_token_ids was ignored: the random model drew from all 512 ids."""
    extra = {"allowed_token_ids": ALLOWED, "return_tokens_as_token_ids": True, "ignore_eos": True}
    kw = dict(model=MODEL, prompt="Once", max_tokens=12, n=3, seed=11, logprobs=0)
    first = client.completions.create(**kw, extra_body=extra)
    ids = [drawn_ids(c) for c in first.choices]
    assert all(len(c) == 12 and set(c) <= set(ALLOWED) for c in ids)
    assert len({t for c in ids for t in c}) > 1  # drawn among them, not one forced id
    again = client.completions.create(**kw, extra_body=extra)
    assert [drawn_ids(c) for c in again.choices] == ids
    greedy = chat(client, max_tokens=6, temperature=0, logprobs=True, **extra)
    names = [t.token for t in greedy.choices[0].logprobs.content]
    assert names and {int(n.split(":")[1]) for n in names} <= set(ALLOWED)


def word_ids(srv: LiveServer, text: str) -> list[int]:
    body = {"model": MODEL, "prompt": text, "add_special_tokens": False}
    return httpx.post(srv.url + "/tokenize", json=body, timeout=30).json()["tokens"]


def holds(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_bad_words_are_never_generated(srv: LiveServer, client: openai.OpenAI) -> None:
    """A word the greedy output spells (as its tokens, mid-text) is banned: the output goes
    another way. Before, bad_words was ignored and the same text came back."""
    extra = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, logprobs=0)
    plain = drawn_ids(client.completions.create(**kw, extra_body=extra).choices[0])
    text = httpx.post(srv.url + "/detokenize", json={"model": MODEL, "tokens": plain}).json()
    words = [w for w in text["prompt"].split() if w.isascii() and w.isalnum()]
    banned = next(
        w
        for w in words
        if any(len(p) > 1 and holds(plain, p) for p in (word_ids(srv, w), word_ids(srv, " " + w)))
    )  # a multi-token word: its last token is banned only after the others
    out = client.completions.create(**kw, extra_body={**extra, "bad_words": [banned]})
    ids = drawn_ids(out.choices[0])
    assert ids != plain
    assert not holds(ids, word_ids(srv, banned)) and not holds(ids, word_ids(srv, " " + banned))


def test_prompt_logprobs_score_the_chat_prompt_as_vllm_does(
    srv: LiveServer, client: openai.OpenAI
) -> None:
    """vLLM's top-level prompt_logprobs on chat (per choice on completions): null first, then
    {token id: {logprob, rank, decoded_token}} for the prompt's token and the k most likely.
    Before, chat ignored the field and returned none."""
    r = chat(client, max_tokens=2, prompt_logprobs=2)
    scored = r.model_extra["prompt_logprobs"]
    assert len(scored) == r.usage.prompt_tokens and scored[0] is None
    prompt = word_ids(srv, RENDERED_USER + "<|im_start|>assistant\n")
    for token, entry in zip(prompt[1:], scored[1:], strict=True):
        assert str(token) in entry and 2 <= len(entry) <= 3
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2] and all(e["logprob"] <= 0 for e in entry.values())
        assert entry[str(token)]["decoded_token"] is not None
    done = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    per_choice = done.choices[0].model_extra["prompt_logprobs"]
    assert per_choice[0] is None and all(len(e) == 1 for e in per_choice[1:])
    assert [int(next(iter(e))) for e in per_choice[1:]] == word_ids(srv, "Once upon")[1:]


def test_prompt_logprobs_of_n_choices_are_the_one_prompts(client: openai.OpenAI) -> None:
    """n choices share one prompt: it is scored once (tests/unit/test_prompt_logprobs_once.py
    counts the scorings) and every choice of a completion shows that one scoring, the same as
    a single choice's; chat's, at the top, is the same as with n=1."""
    one = chat(client, max_tokens=2, prompt_logprobs=2).model_extra["prompt_logprobs"]
    three = chat(client, max_tokens=2, prompt_logprobs=2, n=3)
    assert len(three.choices) == 3 and three.model_extra["prompt_logprobs"] == one
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 2}
    alone = client.completions.create(**body, extra_body={"prompt_logprobs": 1})
    shared = client.completions.create(**body, n=3, extra_body={"prompt_logprobs": 1})
    expected = alone.choices[0].model_extra["prompt_logprobs"]
    assert [c.model_extra["prompt_logprobs"] for c in shared.choices] == [expected] * 3
    # best_of keeps whichever candidate is likeliest, not the one that scored the prompt.
    best = client.completions.create(**body, best_of=3, logprobs=1, echo=True, temperature=1)
    echoed = best.choices[0].logprobs.token_logprobs[: len(expected)]
    assert echoed[0] is None and all(isinstance(lp, float) for lp in echoed[1:])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_restrictions_that_cannot_hold_are_400s(srv: LiveServer, extra: dict, param: str) -> None:
    for route, body in (("chat/completions", {"messages": USER}), ("completions", {"prompt": "x"})):
        r = httpx.post(
            f"{srv.url}/v1/{route}", json={"model": MODEL, "max_tokens": 2, **body, **extra}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith(param), r.text


# -- strict booleans (OpenAI's 400 for "true", "yes" or 1) -------------------------------------
@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("chat/completions", {"messages": USER, "stream": "yes"}, "stream"),
        ("chat/completions", {"messages": USER, "logprobs": 1}, "logprobs"),
        ("chat/completions", {"messages": USER, "stream": True,
                              "stream_options": {"include_usage": "true"}},
         "stream_options.include_usage"),
        ("completions", {"prompt": "x", "echo": "true"}, "echo"),
        ("completions", {"prompt": "x", "ignore_eos": 0}, "ignore_eos"),
        ("responses", {"input": "x", "store": "false"}, "store"),
        ("responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "s",
                       "schema": {"type": "object"}, "strict": "yes"}}}, "text.format.strict"),
    ],
)  # fmt: skip
def test_a_boolean_given_as_a_string_or_number_is_a_400(
    srv: LiveServer, route: str, body: dict, param: str
) -> None:
    """pydantic's lax mode took "yes" for true (a stream came back); OpenAI answers 400."""
    r = httpx.post(f"{srv.url}/v1/{route}", json={"model": MODEL, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
