"""Responses' `truncation: "auto"` with the official client on a live server: a conversation
past the tiny model's context runs with its oldest turns dropped (the fewest that
make it fit, whole turns, the instructions kept) where "disabled" (the default) is a 400; the
input_tokens endpoint counts what would run; a last turn too long alone is still a 400."""

from __future__ import annotations

import openai
import pytest

from tests.conformance import assert_valid

MODEL = "tiny-llama"
SEED = {"seed": 5}
INSTRUCTIONS = "Answer in one word."
OUT = 8  # max_output_tokens: the room the prompt leaves


def turn(i: int, words: int = 12) -> list[dict]:
    """One exchange: a user message and the assistant's answer, as input items."""
    said = " ".join(f"w{i}x{j}" for j in range(words))
    return [
        {"type": "message", "role": "user", "content": f"question {i}: {said}"},
        {"type": "message", "role": "assistant", "content": f"answer {i}: {said}"},
    ]


def conversation(turns: int, words: int = 12) -> list[dict]:
    items = [item for i in range(turns) for item in turn(i, words)]
    return [*items, {"type": "message", "role": "user", "content": "and now?"}]


def counted(client: openai.OpenAI, items: list[dict], **kw) -> int:
    return client.responses.input_tokens.count(
        model=MODEL, input=items, instructions=INSTRUCTIONS, **kw
    ).input_tokens


def context(client: openai.OpenAI) -> int:
    return client.models.retrieve(MODEL).model_extra["max_model_len"]


def fitting_suffix(client: openai.OpenAI, items: list[dict]) -> list[dict]:
    """The longest run of whole turns, ending with the last, whose prompt leaves room for OUT
    tokens: what truncation "auto" should keep, found here by counting each candidate."""
    starts = [i for i, it in enumerate(items) if it["role"] == "user"]
    for start in starts:
        try:
            if counted(client, items[start:]) + OUT <= context(client):
                return items[start:]
        except openai.BadRequestError as e:  # too many bytes to count
            assert e.code == "context_length_exceeded"
    raise AssertionError("no suffix fits")


def test_disabled_by_default_is_a_400(client: openai.OpenAI) -> None:
    items = conversation(12)
    assert counted(client, items) + OUT > context(client)  # the premise: it does not fit
    for extra in ({}, {"truncation": "disabled"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(
                model=MODEL, input=items, max_output_tokens=OUT, extra_body=SEED, **extra
            )
        assert e.value.code == "context_length_exceeded" and e.value.param == "input"


@pytest.mark.parametrize("turns", [12, 120])  # 120: too many bytes to tokenize whole
def test_auto_drops_the_oldest_turns(client: openai.OpenAI, turns: int) -> None:
    items = conversation(turns)
    kept = fitting_suffix(client, items)
    assert 3 <= len(kept) < len(items)  # some turns dropped, more than the last one kept
    r = client.responses.create(
        model=MODEL, input=items, instructions=INSTRUCTIONS, max_output_tokens=OUT,
        truncation="auto", extra_body=SEED,
    )  # fmt: skip
    alone = client.responses.create(
        model=MODEL, input=kept, instructions=INSTRUCTIONS, max_output_tokens=OUT,
        extra_body=SEED,
    )  # fmt: skip
    # The same prompt ran: the kept turns with the instructions, nothing else.
    assert r.usage.input_tokens == alone.usage.input_tokens == counted(client, kept)
    assert r.output_text == alone.output_text
    assert r.truncation == "auto" and alone.truncation == "disabled"
    assert_valid(client.responses.with_raw_response.retrieve(r.id).http_response.json(), "Response")
    # Every input item is still the response's: truncation shaped the prompt only.
    listed = client.responses.input_items.list(r.id, limit=100, order="asc")
    if len(items) <= 100:
        assert [i.content[0].text for i in listed.data] == [i["content"] for i in items]
    # input_tokens with truncation "auto" counts what would run (beside one new token).
    assert counted(client, items, truncation="auto") <= context(client) - 1


def test_a_chain_past_the_context_goes_on(client: openai.OpenAI) -> None:
    """previous_response_id chains grow each turn: with "auto" the chain never hits the wall."""
    previous, said = None, " ".join(f"z{j}" for j in range(40))
    for i in range(12):
        r = client.responses.create(
            model=MODEL, input=f"step {i}: {said}", previous_response_id=previous,
            max_output_tokens=OUT, truncation="auto", extra_body=SEED,
        )  # fmt: skip
        assert r.status in ("completed", "incomplete")
        assert r.usage.input_tokens + OUT <= context(client)
        previous = r.id
    with pytest.raises(openai.BadRequestError) as e:  # the same chain, truncation disabled
        client.responses.create(
            model=MODEL, input="more", previous_response_id=previous, max_output_tokens=OUT,
            extra_body=SEED,
        )  # fmt: skip
    assert e.value.code == "context_length_exceeded"


def test_a_last_turn_too_long_alone_is_still_a_400(client: openai.OpenAI) -> None:
    items = [*turn(0), {"type": "message", "role": "user", "content": "y " * 2000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MODEL, input=items, max_output_tokens=OUT, truncation="auto", extra_body=SEED
        )
    assert e.value.code == "context_length_exceeded" and e.value.param == "input"


def test_bad_truncation_value(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MODEL, input="hi", max_output_tokens=OUT, extra_body={"truncation": "middle"}
        )
    assert e.value.param == "truncation"
