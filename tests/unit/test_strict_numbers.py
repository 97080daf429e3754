"""Integers, numbers and strings of a request body are strict, as OpenAI is: `"n": "2"`,
`"max_tokens": 5.0`, `"temperature": "0.5"` and `"user": 7` are 400s naming the field, in
OpenAI's words ("Invalid type for 'n': expected an integer, but got a string instead."), where
pydantic's lax mode converted them. An integer is still taken for a number. The walk over
every model is in test_strict_booleans.py; these are the wire models themselves."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from genserve.api.embeddings import EmbeddingRequest
from genserve.api.errors import APIError, install, validation_error
from genserve.api.fine_tuning import CreateJobRequest
from genserve.api.responses_wire import ResponsesRequest, input_items
from genserve.api.schemas import ChatCompletionRequest, CompletionRequest, RegisterModelRequest
from genserve.api.scoring import RerankRequest
from genserve.api.tokenize import DetokenizeRequest
from genserve.api.uploads import CreateUpload

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": USER}
COMPLETION = {"model": "m", "prompt": "x"}


# The JSON types in OpenAI's words, and short names for the models, so that a row is a line.
INT, DEC, NUM, STR, BOOL = "an integer", "a decimal number", "a number", "a string", "a boolean"
ONE = "one of a string or an array"
M, F = {"model": "m"}, {"name": "f"}
Chat, Text, Embed, Resp = (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
)


def refused(model: type[BaseModel], body: dict) -> APIError:
    """The 400 a route answers for this body (the route's errors have "body" first in loc)."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return validation_error([{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()])


def expected(param: str, wanted: str, got: str) -> str:
    return f"Invalid type for '{param}': expected {wanted}, but got {got} instead."


@pytest.mark.parametrize(
    ("model", "body", "param", "wanted", "got"),
    [
        (Chat, {**CHAT, "n": "2"}, "n", INT, STR),
        (Chat, {**CHAT, "max_tokens": "5"}, "max_tokens", INT, STR),
        (Chat, {**CHAT, "max_tokens": 5.5}, "max_tokens", INT, DEC),
        # 5.0 too: OpenAI refuses a decimal for an integer, whatever its fraction.
        (Chat, {**CHAT, "max_tokens": 5.0}, "max_tokens", INT, DEC),
        (Chat, {**CHAT, "n": True}, "n", INT, BOOL),
        (Chat, {**CHAT, "temperature": "0.5"}, "temperature", NUM, STR),
        (Chat, {**CHAT, "top_p": True}, "top_p", NUM, BOOL),
        (Chat, {**CHAT, "seed": "7"}, "seed", INT, STR),
        (Chat, {**CHAT, "user": 7}, "user", STR, INT),
        (Chat, {**CHAT, "logit_bias": {"1": "5"}}, "logit_bias.1", NUM, STR),
        (Chat, {**CHAT, "stop": 5}, "stop", ONE, INT),
        (Chat, {**CHAT, "stop": ["a", 5]}, "stop.[1]", STR, INT),
        (Chat, {**CHAT, "messages": [{"role": "user", "content": 5}]},
         "messages.[0].content", ONE, INT),
        (Chat, {**CHAT, "stream_options": {"include_usage": 1}},
         "stream_options.include_usage", BOOL, INT),
        (Chat, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": 1}}},
         "response_format.json_schema.name", STR, INT),
        (Chat, {**CHAT, "tools": [{"type": "function", "function": {**F, "description": 3}}]},
         "tools.[0].function.description", STR, INT),
        (Chat, {**CHAT, "metadata": {"k": 1}}, "metadata.k", STR, INT),
        (Chat, {**CHAT, "prompt_logprobs": "1"}, "prompt_logprobs", INT, STR),
        (Text, {**COMPLETION, "prompt": [1, "a"]}, "prompt.[1]", INT, STR),
        (Text, {**COMPLETION, "prompt": ["a", 1]}, "prompt.[1]", STR, INT),
        (Text, {**COMPLETION, "prompt": [[1, "a"]]}, "prompt.[0].[1]", INT, STR),
        (Text, {**COMPLETION, "prompt": 5}, "prompt", ONE, INT),
        (Text, {**COMPLETION, "logprobs": "2"}, "logprobs", INT, STR),
        (Text, {**COMPLETION, "best_of": 2.0}, "best_of", INT, DEC),
        (Embed, {**M, "input": [1, "a"]}, "input.[1]", INT, STR),
        (Embed, {**M, "input": ["1", 2]}, "input.[1]", STR, INT),
        (Embed, {**M, "input": "x", "dimensions": "8"}, "dimensions", INT, STR),
        (Resp, {**M, "input": "x", "max_output_tokens": "9"},
         "max_output_tokens", INT, STR),
        (Resp, {**M, "input": "x", "instructions": 1}, "instructions", STR, INT),
        (RerankRequest, {**M, "query": "q", "documents": ["d"], "top_n": "1"}, "top_n", INT, STR),
        (DetokenizeRequest, {**M, "tokens": ["1"]}, "tokens.[0]", INT, STR),
        (CreateJobRequest, {**M, "training_file": "f", "seed": "3"}, "seed", INT, STR),
        (CreateJobRequest, {**M, "training_file": 3}, "training_file", STR, INT),
        (CreateUpload, {"filename": "a", "purpose": "batch", "bytes": 1, "mime_type": "text/plain",
                        "expires_after": {"anchor": "created_at", "seconds": "60"}},
         "expires_after.seconds", INT, STR),
        (RegisterModelRequest, {**M, "settings": {"max_context": "64"}},
         "settings.max_context", INT, STR),
        (RegisterModelRequest, {**M, "settings": {"defaults": {"temperature": "1"}}},
         "settings.defaults.temperature", NUM, STR),
    ],
)  # fmt: skip
def test_a_wrong_json_type_is_a_400_naming_the_field(
    model: type[BaseModel], body: dict, param: str, wanted: str, got: str
) -> None:
    err = refused(model, body)
    assert (err.status, err.param, err.message) == (400, param, expected(param, wanted, got))


def test_right_types_still_parse_and_an_integer_is_a_number() -> None:
    body = ChatCompletionRequest.model_validate(
        {**CHAT, "n": 2, "max_tokens": 5, "temperature": 1, "top_p": 1, "seed": 7, "stop": "x"}
    )
    assert (body.n, body.max_tokens, body.temperature, body.seed) == (2, 5, 1.0, 7)
    assert isinstance(body.temperature, float)
    ids = CompletionRequest.model_validate({**COMPLETION, "prompt": [[1, 2], [3]]})
    assert ids.prompt == [[1, 2], [3]]
    assert EmbeddingRequest.model_validate({"model": "m", "input": [1, 2]}).input == [1, 2]


def test_a_value_of_the_right_type_out_of_bounds_names_the_item() -> None:
    """In a union, the member whose type fits is the one reported (its bound), not `str`."""
    err = refused(CompletionRequest, {**COMPLETION, "prompt": [-1]})
    assert err.param == "prompt.[0]"
    assert "greater than or equal to 0" in err.message


@pytest.mark.parametrize("value", [3.0, "3", True])
def test_a_fine_tuning_epoch_count_is_a_json_integer(value: object) -> None:
    body = {"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": value}}
    assert refused(CreateJobRequest, body).param == "hyperparameters.n_epochs"


def test_a_responses_text_part_must_hold_text() -> None:
    with pytest.raises(APIError) as caught:
        input_items([{"role": "user", "content": [{"type": "input_text", "text": 5}]}])
    assert (caught.value.status, caught.value.param) == (400, "input")


def test_the_whole_body_of_another_type_is_named() -> None:
    err = validation_error([{"type": "model_attributes_type", "loc": ("body",), "input": [1]}])
    assert (
        err.message
        == "Invalid type for the request body: expected an object, but got an array instead."
    )


def test_query_integers_still_parse_from_a_url() -> None:
    """A list endpoint's `limit` comes from a URL, where "10" is the only spelling there is."""
    app = FastAPI()
    install(app)

    @app.get("/items")
    def items(limit: int = Query(20, ge=1)) -> dict:
        return {"limit": limit}

    client = TestClient(app)
    assert client.get("/items?limit=10").json() == {"limit": 10}
    assert client.get("/items?limit=ten").status_code == 400
