"""vLLM's extra request fields at the edge: structured outputs in both spellings become the one
GrammarSpec (or a 400 naming the field), and the chat-template controls are checked as vLLM
checks them. Pure functions on the wire models: no model, no server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from genserve.api.chat import template_options
from genserve.api.errors import APIError
from genserve.api.schemas import ChatCompletionRequest, CompletionRequest
from genserve.api.structured import output_constraint
from genserve.engine.types import GrammarSpec
from genserve.runtime.generation import TemplateOptions

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
USER = [{"role": "user", "content": "hi"}]


def completion(**extra: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **extra})


def chat(messages: list[dict] | None = None, **extra: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages or USER, **extra}
    )


@pytest.mark.parametrize(
    ("extra", "param", "spec"),
    [
        ({"guided_json": SCHEMA}, "guided_json", GrammarSpec.json_schema(SCHEMA)),
        ({"guided_regex": "[a-z]+"}, "guided_regex", GrammarSpec.regex("[a-z]+")),
        ({"guided_choice": ["yes", "no"]}, "guided_choice", GrammarSpec.choice(["yes", "no"])),
        ({"guided_grammar": 'start: "x"'}, "guided_grammar", GrammarSpec.grammar('start: "x"')),
        (
            {"structured_outputs": {"json": '{"type": "object"}'}},  # a schema's JSON text
            "structured_outputs.json",
            GrammarSpec.json_schema({"type": "object"}),
        ),
        (
            {"structured_outputs": {"regex": r"\d+"}},
            "structured_outputs.regex",
            GrammarSpec.regex(r"\d+"),
        ),
        (
            {"structured_outputs": {"choice": ["a"]}},
            "structured_outputs.choice",
            GrammarSpec.choice(["a"]),
        ),
        (
            {"structured_outputs": {"grammar": "root ::= [0-9]"}},
            "structured_outputs.grammar",
            GrammarSpec.grammar("root ::= [0-9]"),
        ),
        (
            {"structured_outputs": {"json_object": True}},
            "structured_outputs.json_object",
            GrammarSpec.json_object(),
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_decoding_backend": "xgrammar"},
            "response_format",
            GrammarSpec.json_object(),
        ),
    ],
)
def test_each_spelling_becomes_the_one_grammar_naming_its_field(
    extra: dict, param: str, spec: GrammarSpec
) -> None:
    for body in (completion(**extra), chat(**extra)):
        constraint = output_constraint(body)
        assert constraint is not None
        assert (constraint.spec, constraint.param) == (spec, param)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"structured_outputs": {"json_object": False}},  # false asks for nothing
        {"structured_outputs": {"disable_any_whitespace": True}},  # always compact anyway
        {"response_format": {"type": "text"}},
        {"guided_decoding_backend": "outlines"},  # one backend here: accepted, ignored
    ],
)
def test_no_constraint_means_free_text(extra: dict) -> None:
    assert output_constraint(completion(**extra)) is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
        (
            {"structured_outputs": {"json": SCHEMA, "json_object": True}},
            "structured_outputs.json_object",
        ),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}},
            "structured_outputs.choice",
        ),
    ],
)
def test_two_constraints_at_once_are_a_400_naming_the_second(extra: dict, param: str) -> None:
    with pytest.raises(APIError) as e:
        output_constraint(completion(**extra))
    assert (e.value.status, e.value.param) == (400, param)
    assert "one constraint" in e.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"structured_outputs": {"whitespace_pattern": " *"}},
            "structured_outputs.whitespace_pattern",
        ),
        ({"guided_whitespace_pattern": " *", "guided_json": SCHEMA}, "guided_whitespace_pattern"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        (
            {"structured_outputs": {"json": SCHEMA, "disable_additional_properties": True}},
            "structured_outputs.disable_additional_properties",
        ),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"structured_outputs": {"json": "3"}}, "structured_outputs.json"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(extra: dict, param: str) -> None:
    with pytest.raises(APIError) as e:
        output_constraint(chat(**extra))
    assert (e.value.status, e.value.param) == (400, param)


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"jsn": SCHEMA}},  # misspelt: never free text instead
        {"structured_outputs": {"choice": []}},
        {"guided_choice": []},
        {"guided_choice": "yes"},
    ],
)
def test_malformed_fields_fail_validation(extra: dict) -> None:
    with pytest.raises(ValidationError):
        completion(**extra)


def test_template_controls_default_to_a_generation_prompt() -> None:
    body = chat()
    assert template_options(body, body.messages) == TemplateOptions(True, False, {}, None)


def test_continuing_the_final_message_drops_the_generation_prompt() -> None:
    turns = [*USER, {"role": "assistant", "content": "Once upon"}]
    docs = [{"title": "t", "text": "x"}]
    body = chat(
        turns,
        continue_final_message=True,
        chat_template_kwargs={"enable_thinking": False},
        documents=docs,
    )
    options = template_options(body, body.messages)
    assert options == TemplateOptions(False, True, {"enable_thinking": False}, tuple(docs))
    body = chat(turns, continue_final_message=True, add_generation_prompt=False)
    assert template_options(body, body.messages).add_generation_prompt is False


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (
            [*USER, {"role": "assistant", "content": "x"}],
            {"continue_final_message": True, "add_generation_prompt": True},
            "continue_final_message",
        ),
        (USER, {"continue_final_message": True}, "messages"),  # nothing of the assistant's
    ],
)
def test_template_controls_vllm_refuses_are_400s(
    messages: list[dict], extra: dict, param: str
) -> None:
    body = chat(messages, **extra)
    with pytest.raises(APIError) as e:
        template_options(body, body.messages)
    assert (e.value.status, e.value.param) == (400, param)


@pytest.mark.parametrize("key", ["messages", "tools", "tokenize", "add_generation_prompt"])
def test_template_kwargs_may_not_replace_what_genserve_passes(key: str) -> None:
    with pytest.raises(ValidationError) as e:
        chat(chat_template_kwargs={key: 1})
    assert e.value.errors()[0]["loc"] == ("chat_template_kwargs",)
    assert key in str(e.value)


def test_a_grammar_that_fails_mid_decode_names_the_field_it_came_from() -> None:
    """The engine only knows a grammar ran past its limits; the 400 names the body's field
    (a guided_regex, a tool's schema), not always response_format."""
    from genserve.engine.client import EngineError
    from genserve.engine.types import FailureKind, RequestFailure
    from genserve.runtime.errors import InvalidRequest
    from genserve.runtime.generation import failure_error

    failure = RequestFailure("response_format grammar ran out of fuel", FailureKind.INVALID,
                             "response_format")  # fmt: skip
    err = failure_error(EngineError("x", failure), "guided_regex")
    assert isinstance(err, InvalidRequest) and err.param == "guided_regex"
    assert "guided_regex grammar ran out of fuel" in err.message
    assert failure_error(EngineError("x", failure)).param == "response_format"


@pytest.mark.parametrize("field", ["structured_outputs", "guided_choice"])
def test_a_choice_list_past_its_cap_is_a_400_naming_the_field(field: str) -> None:
    """One option past the cap is refused (100k ended in the grammar library's panic, quoted
    in the 400); the cap's count is a choice grammar (test_grammar compiles one that long)."""
    from genserve.api.errors import validation_error
    from genserve.api.schemas import MAX_CHOICES

    def body(n: int) -> dict:
        options = [f"label {i}" for i in range(n)]
        value = {"choice": options} if field == "structured_outputs" else options
        return {"model": "m", "prompt": "x", field: value}

    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(body(MAX_CHOICES + 1))
    assert validation_error(caught.value.errors()).param.startswith(field)
    constraint = output_constraint(CompletionRequest.model_validate(body(MAX_CHOICES)))
    assert constraint.spec.kind == "choice"
